//! Where each value of a YAML document sits, so that errors found after parsing (by serde or by
//! planning) can still name a line.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, Span, SpannedEventReceiver};

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Maps dotted paths (`steps[1].operator`) to the position of the key (for map entries) or of the
/// item (for sequence entries).
#[derive(Debug, Default, Clone)]
pub struct Locations {
    positions: HashMap<String, Position>,
}

impl Locations {
    /// Indexes `text`. Syntax errors are not reported here (serde_yaml reports them with a
    /// position); an unparsable document simply yields fewer locations.
    pub fn index(text: &str) -> Self {
        let mut walker = Walker::default();
        let mut parser = Parser::new_from_str(text);
        let _ = parser.load(&mut walker, false);
        Locations {
            positions: walker.positions,
        }
    }

    /// The position of `path`, or of its nearest indexed ancestor.
    pub fn find(&self, path: &str) -> Option<Position> {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    positions: HashMap<String, Position>,
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Walker {
    /// Called for every value node; returns the path of the node that starts here.
    fn value_path(&mut self, span: Span) -> Option<String> {
        let pos = Position {
            line: span.start.line(),
            column: span.start.col() + 1,
        };
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                self.positions.insert(p.clone(), pos);
                Some(p)
            }
            Some(Frame::Map { path, key }) => key.take().map(|k| join(path, &k)),
        }
    }
}

impl<'input> SpannedEventReceiver<'input> for Walker {
    fn on_event(&mut self, ev: Event<'input>, span: Span) {
        match ev {
            Event::Scalar(value, ..) => {
                if let Some(Frame::Map { path, key }) = self.stack.last_mut()
                    && key.is_none()
                {
                    let p = join(path, &value);
                    self.positions.insert(
                        p,
                        Position {
                            line: span.start.line(),
                            column: span.start.col() + 1,
                        },
                    );
                    *key = Some(value.into_owned());
                    return;
                }
                self.value_path(span);
            }
            Event::Alias(_) => {
                self.value_path(span);
            }
            Event::MappingStart(..) => {
                let path = self.value_path(span).unwrap_or_default();
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.value_path(span).unwrap_or_default();
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_and_items() {
        let text = "name: x\nsteps:\n  - sql: SELECT 1\n  - operator: embed\n    inputs: [text]\nsink:\n  parquet:\n    path: out.parquet\n";
        let loc = Locations::index(text);
        assert_eq!(loc.find("name").unwrap().line, 1);
        assert_eq!(loc.find("steps[1].operator").unwrap().line, 4);
        assert_eq!(loc.find("steps[1].inputs").unwrap().line, 5);
        assert_eq!(loc.find("sink.parquet.path").unwrap().line, 8);
        // Unknown paths fall back to their nearest ancestor.
        assert_eq!(loc.find("sink.parquet.nope").unwrap().line, 7);
    }
}
