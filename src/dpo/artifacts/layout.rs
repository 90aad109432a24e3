//! Phase 4: the batch layout of the train and eval graphs. Packed (several sequences and a pair's
//! shared prompt in one row) needs the model's attention mask and positions as inputs
//! (`packing::make_packable`); `auto` falls back to padded rows, with the reason, where that rewrite
//! does not understand the model.

use crate::dpo::model::LmSignature;
use crate::dpo::packing::{self, Layout, LayoutChoice};
use crate::graph::Graph;
use crate::{Error, Result};

/// The model graph laid out for training, to which the objective is appended.
pub struct LaidOut {
    pub graph: Graph,
    pub layout: Layout,
    /// Packed: whether positions come from betadpo's own input (`false`: the model's `position_ids`).
    pub own_positions: Option<bool>,
    /// Why `LayoutChoice::Auto` chose the padded layout.
    pub not_packed_because: Option<String>,
}

pub fn choose(base: &Graph, sig: &LmSignature, choice: LayoutChoice) -> Result<LaidOut> {
    let padded = |why| LaidOut { graph: base.clone(), layout: Layout::Padded, own_positions: None, not_packed_because: why };
    if choice == LayoutChoice::Padded {
        return Ok(padded(None));
    }
    let mut graph = base.clone();
    match packing::make_packable(&mut graph, sig) {
        Ok(own) => Ok(LaidOut { graph, layout: Layout::Packed, own_positions: Some(own), not_packed_because: None }),
        Err(Error::NotPackable(why)) if choice == LayoutChoice::Auto => Ok(padded(Some(why))),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpo::artifacts::load::{load, tests::quickstart_model};

    /// The quickstart Llama packs (its mask and positions become the packed inputs), and the padded
    /// choice leaves the model's graph exactly as it was.
    #[test]
    fn packs_the_quickstart_llama_and_leaves_it_alone_when_padded() {
        let m = load(&quickstart_model(), None).unwrap();
        let packed = choose(&m.base, &m.sig, LayoutChoice::Auto).unwrap();
        assert_eq!(packed.layout, Layout::Packed, "{:?}", packed.not_packed_because);
        assert!(packed.graph.has_input(packing::ATTENTION_BIAS));
        let padded = choose(&m.base, &m.sig, LayoutChoice::Padded).unwrap();
        assert_eq!(padded.layout, Layout::Padded);
        assert_eq!(padded.graph.nodes, m.base.nodes);
        assert!(!padded.graph.has_input(packing::ATTENTION_BIAS));
    }

    /// A model without attention has no mask to replace: `packed` is refused with the reason, `auto` pads.
    #[test]
    fn a_model_without_attention_pads_under_auto_and_is_refused_under_packed() {
        let mut base = load(&quickstart_model(), None).unwrap();
        base.base.nodes.retain(|n| n.op_type != "Softmax");
        let auto = choose(&base.base, &base.sig, LayoutChoice::Auto).unwrap();
        assert_eq!(auto.layout, Layout::Padded);
        assert!(auto.not_packed_because.is_some());
        assert!(matches!(choose(&base.base, &base.sig, LayoutChoice::Packed), Err(Error::NotPackable(_))));
    }
}
