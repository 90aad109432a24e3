//! Fresh tensor and node names. Every name the crate adds is derived from what it stands for
//! (`x_grad`, `beta_head/softplus`), with a numeric suffix only when the plain name is taken.

use std::collections::HashSet;

use super::Graph;

#[derive(Clone, Debug, Default)]
pub struct Names {
    used: HashSet<String>,
}

impl Names {
    pub fn from_graph(g: &Graph) -> Self {
        let mut used = HashSet::new();
        used.extend(g.inputs.iter().map(|v| v.name.clone()));
        used.extend(g.outputs.iter().map(|v| v.name.clone()));
        used.extend(g.initializers.iter().map(|t| t.name.clone()));
        for n in &g.nodes {
            used.extend(n.output.iter().cloned());
            used.insert(n.name.clone());
        }
        Names { used }
    }

    /// `base` itself when unused, else `base_1`, `base_2`, ...
    pub fn fresh(&mut self, base: &str) -> String {
        if self.used.insert(base.to_string()) {
            return base.to_string();
        }
        let mut i = 1usize;
        loop {
            let cand = format!("{base}_{i}");
            if self.used.insert(cand.clone()) {
                return cand;
            }
            i += 1;
        }
    }

    pub fn reserve(&mut self, name: &str) -> bool {
        self.used.insert(name.to_string())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.used.contains(name)
    }
}
