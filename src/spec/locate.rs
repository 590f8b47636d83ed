//! Where each value of a YAML document sits, so that errors found after parsing (by serde or by
//! planning) can still name a line. Filled by [`super::yaml::parse`].

use std::collections::HashMap;

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
    /// Records where the value at `path` sits.
    pub fn insert(&mut self, path: String, at: Position) {
        self.positions.insert(path, at);
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
