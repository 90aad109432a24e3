//! The two batch layouts of the train and eval graphs: TRL's padded rows, or pairs packed into
//! shared rows (see `packing`).

/// How a batch is laid out in the train and eval graphs' inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `2B` right-padded rows: chosen rows, then rejected rows (TRL's concatenated forward).
    #[default]
    Padded,
    /// Pairs packed into shared rows (see the module documentation).
    Packed,
}

impl std::fmt::Display for Layout {
    /// The manifest's spelling (`padded`, `packed`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Padded => "padded",
            Layout::Packed => "packed",
        })
    }
}

/// The layout build-graph is asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutChoice {
    /// Packed when the model allows it, padded otherwise (the reason is reported).
    Auto,
    #[default]
    Padded,
    Packed,
}
