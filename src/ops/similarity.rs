//! `cosine_similarity(a, b)`: a plain SQL function over embedding columns, so that nearest
//! neighbours are one `ORDER BY` away.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array};
use datafusion::arrow::datatypes::{DataType, Float32Type, Float64Type};
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CosineSimilarity {
    signature: Signature,
}

/// The function, ready to register.
pub fn cosine_similarity() -> ScalarUDF {
    ScalarUDF::new_from_impl(CosineSimilarity {
        signature: Signature::user_defined(Volatility::Immutable),
    })
}

fn is_vector(t: &DataType) -> bool {
    match t {
        DataType::FixedSizeList(f, _) | DataType::List(f) | DataType::LargeList(f) => {
            matches!(f.data_type(), DataType::Float32 | DataType::Float64)
        }
        DataType::Null => true,
        _ => false,
    }
}

/// Values of row `i` of a list-like array as f64, or None when null.
fn row(array: &ArrayRef, i: usize) -> Option<Vec<f64>> {
    if array.is_null(i) {
        return None;
    }
    let values = match array.data_type() {
        DataType::FixedSizeList(..) => array.as_fixed_size_list().value(i),
        DataType::List(_) => array.as_list::<i32>().value(i),
        DataType::LargeList(_) => array.as_list::<i64>().value(i),
        _ => return None,
    };
    match values.data_type() {
        DataType::Float32 => Some(
            values
                .as_primitive::<Float32Type>()
                .values()
                .iter()
                .map(|&v| v as f64)
                .collect(),
        ),
        DataType::Float64 => Some(values.as_primitive::<Float64Type>().values().to_vec()),
        _ => None,
    }
}

impl ScalarUDFImpl for CosineSimilarity {
    fn name(&self) -> &str {
        "cosine_similarity"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if arg_types.len() != 2 || !arg_types.iter().all(is_vector) {
            return plan_err!(
                "cosine_similarity takes two vectors (lists of Float32 or Float64), got ({})",
                arg_types
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(arg_types.to_vec())
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let a = args.args[0].to_array(n)?;
        let b = args.args[1].to_array(n)?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(match (row(&a, i), row(&b, i)) {
                (Some(x), Some(y)) => {
                    if x.len() != y.len() {
                        return exec_err!(
                            "cosine_similarity: row {i} has vectors of lengths {} and {}",
                            x.len(),
                            y.len()
                        );
                    }
                    let dot: f64 = x.iter().zip(&y).map(|(p, q)| p * q).sum();
                    let nx = x.iter().map(|v| v * v).sum::<f64>().sqrt();
                    let ny = y.iter().map(|v| v * v).sum::<f64>().sqrt();
                    if nx == 0.0 || ny == 0.0 {
                        None
                    } else {
                        Some(dot / (nx * ny))
                    }
                }
                _ => None,
            });
        }
        Ok(ColumnarValue::Array(Arc::new(Float64Array::from(out))))
    }
}
