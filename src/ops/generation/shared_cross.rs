//! One cross-attention cache per source row, shared by the row's beams.
//!
//! An Optimum encoder-decoder export takes its cross-attention cache
//! (`past_key_values.N.encoder.key|value`, [batch, heads, source, head_dim]) with a row per
//! decoded sequence: with 5 beams, 5 identical copies of every recording's cache (18 MB a copy
//! for Whisper base), which every step reads and which move whenever rows join or leave a
//! batch. [`share_cross_attention`] rewrites a decoder's cross-attention so that it takes one
//! cache row per source, the beams of a row being the query positions of one attention:
//!
//! ```text
//! q [rows*beams, heads, steps, d] -> [rows, heads, beams*steps, d]
//! scores = q @ K^T   (K: [rows, heads, source, d])     softmax over the source
//! out = scores @ V -> [rows*beams, heads, steps, d]
//! ```
//!
//! The same products, grouped: each beam's query still meets its row's keys and values only.
//! The model's own nodes stay; a few Shape/Reshape/Transpose nodes are added around the two
//! MatMuls. The cache inputs' first dimension is renamed [`SOURCE_ROWS`], which is how the
//! generation core recognises a decoder that shares ([`super::model::Seq2Seq`]).
//!
//! The rewrite applies only to the exact pattern it knows (K transposed, scaled by constants,
//! MatMul, Softmax over the source, MatMul with V: the eager attention of Whisper exports) in
//! every layer; a decoder with a cross-attention mask (BART, Marian, T5: the mask has a row per
//! sequence), any other consumer of the cache, or external weights leave the model as it is.

use std::collections::{HashMap, HashSet};

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::tensor_shape_proto::dimension;
use onnx_protobuf::{AttributeProto, GraphProto, Message, ModelProto, NodeProto, type_proto};

/// The name of the first dimension of a shared cross-attention cache input.
pub const SOURCE_ROWS: &str = "source_rows";

/// Rewrites an ONNX decoder (serialized) so that its cross-attention cache has a row per
/// source; None when the model is not one this rewrite knows (it is then used as it is).
pub fn share_cross_attention(bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut model =
        ModelProto::parse_from_bytes(bytes).map_err(|e| format!("reading the model: {e}"))?;
    // Shape's start/end attributes came with opset 15.
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version);
    let Some(graph) = model.graph.as_mut() else {
        return Ok(None);
    };
    let layers = (0..)
        .take_while(|i| has_input(graph, &format!("past_key_values.{i}.encoder.key")))
        .count();
    if opset < 15
        || layers == 0
        || has_input(graph, "encoder_attention_mask")
        || external_weights(graph)
    {
        return Ok(None);
    }
    let caches: Vec<(String, String)> = (0..layers)
        .map(|i| {
            (
                format!("past_key_values.{i}.encoder.key"),
                format!("past_key_values.{i}.encoder.value"),
            )
        })
        .collect();
    let mut rewritten = vec![0usize; layers];
    if !rewrite(graph, &caches, &HashSet::new(), &mut rewritten) {
        return Ok(None);
    }
    // Every layer's attention rewritten wherever the cache is read, and nowhere left unread.
    if rewritten.contains(&0) {
        return Ok(None);
    }
    for input in graph.input.iter_mut() {
        let shared = input.name == "encoder_hidden_states"
            || caches
                .iter()
                .any(|(k, v)| input.name == *k || input.name == *v);
        if !shared {
            continue;
        }
        if let Some(type_proto::Value::TensorType(t)) =
            input.type_.as_mut().and_then(|t| t.value.as_mut())
            && let Some(first) = t.shape.as_mut().and_then(|s| s.dim.first_mut())
        {
            first.value = Some(dimension::Value::DimParam(SOURCE_ROWS.to_string()));
        }
    }
    model
        .write_to_bytes()
        .map(Some)
        .map_err(|e| format!("writing the rewritten model: {e}"))
}

fn has_input(graph: &GraphProto, name: &str) -> bool {
    graph.input.iter().any(|i| i.name == name)
}

/// Weights in files beside the model: a model read from memory cannot find them.
fn external_weights(graph: &GraphProto) -> bool {
    graph
        .initializer
        .iter()
        .any(|t| t.data_location.enum_value() == Ok(DataLocation::EXTERNAL))
        || graph.node.iter().any(|n| {
            n.attribute
                .iter()
                .filter_map(|a| a.g.as_ref())
                .any(external_weights)
        })
}

/// Rewrites the attention over each cache (key, value) that `graph` or its subgraphs read,
/// counting rewrites per layer in `rewritten`; false when a cache is read any other way.
/// `outer`: constant names of the enclosing graphs (initializers a subgraph may scale by).
fn rewrite(
    graph: &mut GraphProto,
    caches: &[(String, String)],
    outer: &HashSet<String>,
    rewritten: &mut [usize],
) -> bool {
    // Value info describes shapes this rewrite changes; ONNX Runtime infers them again.
    graph.value_info.clear();
    let mut constants = outer.clone();
    constants.extend(graph.initializer.iter().map(|t| t.name.clone()));
    constants.extend(
        graph
            .node
            .iter()
            .filter(|n| n.op_type == "Constant")
            .flat_map(|n| n.output.iter().cloned()),
    );
    for node in graph.node.iter_mut() {
        for attribute in node.attribute.iter_mut() {
            if let Some(g) = attribute.g.as_mut()
                && !rewrite(g, caches, &constants, rewritten)
            {
                return false;
            }
        }
    }
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    // The nodes reading each value, by index.
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for input in &n.input {
            readers.entry(input.as_str()).or_default().push(i);
        }
    }
    let mut plans = Vec::new();
    for (layer, (key, value)) in caches.iter().enumerate() {
        if !readers.contains_key(key.as_str()) && !readers.contains_key(value.as_str()) {
            continue;
        }
        match attention(graph, &readers, key, value, &constants, &outputs) {
            Some(plan) => plans.push((layer, key.clone(), plan)),
            None => return false,
        }
    }
    // Nodes go in after the MatMuls they feed or read, latest first so indices stay valid.
    let mut edits: Vec<(usize, Vec<NodeProto>)> = Vec::new();
    for (layer, key, plan) in plans {
        rewritten[layer] += 1;
        let p = |s: &str| format!("ferry/shared_cross/{layer}/{s}");
        let q = graph.node[plan.scores].input[0].clone();
        let out = graph.node[plan.context].output[0].clone();
        let shape = |from: &str, start: i64, end: Option<i64>, to: &str| {
            let mut attrs = vec![int("start", start)];
            attrs.extend(end.map(|e| int("end", e)));
            node("Shape", &[from], &p(to), attrs)
        };
        let before = vec![
            shape(&key, 0, Some(1), "rows"),
            node("Shape", &[&q], &p("q_shape"), Vec::new()),
            shape(&q, 1, Some(2), "heads"),
            shape(&q, 2, Some(3), "steps"),
            shape(&q, 3, None, "head_dim"),
            node("Constant", &[], &p("any"), vec![ints("value_ints", &[-1])]),
            concat(
                &[
                    &p("rows"),
                    &p("any"),
                    &p("heads"),
                    &p("steps"),
                    &p("head_dim"),
                ],
                &p("q5_shape"),
            ),
            node("Reshape", &[&q, &p("q5_shape")], &p("q5"), Vec::new()),
            node(
                "Transpose",
                &[&p("q5")],
                &p("q5_t"),
                vec![ints("perm", &[0, 2, 1, 3, 4])],
            ),
            concat(
                &[&p("rows"), &p("heads"), &p("any"), &p("head_dim")],
                &p("q_rows_shape"),
            ),
            node(
                "Reshape",
                &[&p("q5_t"), &p("q_rows_shape")],
                &p("q_rows"),
                Vec::new(),
            ),
        ];
        let after = vec![
            concat(
                &[
                    &p("rows"),
                    &p("heads"),
                    &p("any"),
                    &p("steps"),
                    &p("head_dim"),
                ],
                &p("out5_shape"),
            ),
            node(
                "Reshape",
                &[&p("out_rows"), &p("out5_shape")],
                &p("out5"),
                Vec::new(),
            ),
            node(
                "Transpose",
                &[&p("out5")],
                &p("out5_t"),
                vec![ints("perm", &[0, 2, 1, 3, 4])],
            ),
            node("Reshape", &[&p("out5_t"), &p("q_shape")], &out, Vec::new()),
        ];
        graph.node[plan.scores].input[0] = p("q_rows");
        graph.node[plan.context].output[0] = p("out_rows");
        edits.push((plan.context + 1, after));
        edits.push((plan.scores, before));
    }
    edits.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    for (at, nodes) in edits {
        graph.node.splice(at..at, nodes);
    }
    true
}

/// Where one layer's cross-attention sits in a graph's nodes.
struct Attention {
    /// MatMul(q, scaled K^T).
    scores: usize,
    /// MatMul(softmax, V).
    context: usize,
}

/// Matches `K -> Transpose(0,1,3,2) -> (Mul|Div by constants)* -> MatMul(q, .) -> Softmax(-1)
/// -> MatMul(., V)` over the cache `key`, `value`, every value in it read by the next node only
/// (`readers`: the nodes reading each value).
fn attention(
    graph: &GraphProto,
    readers: &HashMap<&str, Vec<usize>>,
    key: &str,
    value: &str,
    constants: &HashSet<String>,
    outputs: &HashSet<&str>,
) -> Option<Attention> {
    let read_by = |name: &str| readers.get(name).map_or(&[][..], Vec::as_slice);
    // The one node reading a node's only output, unless that output leaves the graph.
    let next = |i: usize| -> Option<usize> {
        let n = &graph.node[i];
        let [out] = n.output.as_slice() else {
            return None;
        };
        match read_by(out) {
            &[r] if !outputs.contains(out.as_str()) => Some(r),
            _ => None,
        }
    };
    let &[transpose] = read_by(key) else {
        return None;
    };
    let &[context] = read_by(value) else {
        return None;
    };
    let t = &graph.node[transpose];
    if t.op_type != "Transpose" || attr_ints(t, "perm") != Some(&[0, 1, 3, 2][..]) {
        return None;
    }
    let mut at = transpose;
    let scores = loop {
        let n = next(at)?;
        let node = &graph.node[n];
        match node.op_type.as_str() {
            "Mul" | "Div" => {
                let from = &graph.node[at].output[0];
                let [a, b] = node.input.as_slice() else {
                    return None;
                };
                let other = if a == from { b } else { a };
                // Div by a constant only (a constant divided by the keys is not a scale).
                if !constants.contains(other) || (node.op_type == "Div" && a != from) {
                    return None;
                }
                at = n;
            }
            "MatMul" if graph.node[n].input.get(1) == Some(&graph.node[at].output[0]) => break n,
            _ => return None,
        }
    };
    let softmax = next(scores)?;
    let s = &graph.node[softmax];
    let axis = attr_int(s, "axis").unwrap_or(-1);
    if s.op_type != "Softmax" || !(axis == -1 || axis == 3) || next(softmax)? != context {
        return None;
    }
    let c = &graph.node[context];
    (c.op_type == "MatMul"
        && c.input.first() == Some(&s.output[0])
        && c.input.get(1).map(String::as_str) == Some(value)
        && c.output.len() == 1)
        .then_some(Attention { scores, context })
}

fn attr_ints<'a>(node: &'a NodeProto, name: &str) -> Option<&'a [i64]> {
    node.attribute
        .iter()
        .find(|a| a.name == name && a.type_.enum_value() == Ok(AttributeType::INTS))
        .map(|a| a.ints.as_slice())
}

fn attr_int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute
        .iter()
        .find(|a| a.name == name && a.type_.enum_value() == Ok(AttributeType::INT))
        .map(|a| a.i)
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: output.to_string(),
        op_type: op.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        attribute,
        ..Default::default()
    }
}

fn concat(inputs: &[&str], output: &str) -> NodeProto {
    node("Concat", inputs, output, vec![int("axis", 0)])
}

fn int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        type_: AttributeType::INT.into(),
        i,
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        type_: AttributeType::INTS.into(),
        ints: values.to_vec(),
        ..Default::default()
    }
}
