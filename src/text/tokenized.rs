//! A preference pair as token ids: what tokenizing makes, truncation shortens and batches lay out.

use std::collections::BTreeMap;

/// One tokenized pair. The chosen row is `prompt[prompt_cut[0]..] + chosen`, the rejected row
/// `prompt[prompt_cut[1]..] + rejected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// Leading prompt tokens that `keep_end` truncation removed from the chosen and the rejected row
    /// (zero otherwise).
    pub prompt_cut: [usize; 2],
    pub extras: BTreeMap<String, String>,
    /// Index of the row in the loaded data, to trace a pair back to its source.
    pub source_index: usize,
}

impl TokenizedPair {
    /// The prompt as the chosen (`0`) or the rejected (`1`) row holds it.
    pub fn row_prompt(&self, row: usize) -> &[u32] {
        &self.prompt[self.prompt_cut[row]..]
    }

    /// Whether both rows hold the same prompt tokens (always, unless `keep_end` cut them unequally).
    pub fn shares_prompt(&self) -> bool {
        self.prompt_cut[0] == self.prompt_cut[1]
    }

    /// Length of the longer of the two rows: what this pair contributes to a batch's padded width.
    pub fn max_len(&self) -> usize {
        (self.row_prompt(0).len() + self.chosen.len()).max(self.row_prompt(1).len() + self.rejected.len())
    }
}
