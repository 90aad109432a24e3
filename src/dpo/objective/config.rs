//! What the user chose for the objective: where beta comes from and how it is bounded, and
//! which preference loss is used.

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BetaSource {
    /// One beta per pair from the last prompt token (the same for chosen and rejected).
    Prompt,
    /// One beta per sequence from its last non-padding token.
    Sequence,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BetaAggregate {
    Last,
    Mean,
}

/// What the beta head multiplies by its weight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HeadInput {
    /// The hidden state as it is: `w . h`.
    #[default]
    Raw,
    /// The hidden state scaled to unit root-mean-square, and the product scaled by `64 / H`:
    /// `w . (h / rms(h)) x 64 / H`. One Adam step then moves the head's logit as far at every width
    /// and activation scale as the raw head moves it on a 64-wide model with unit-RMS states (where
    /// the default head learning rate was tuned); the raw head moves it by about
    /// `head_lr x H x mean |h|`, which is why it runs away on 576- or 2048-wide models.
    Normalized,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    Sigmoid,
    Ipo,
    Hinge,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ObjectiveConfig {
    pub beta_source: BetaSource,
    pub beta_aggregate: BetaAggregate,
    pub beta_init: f64,
    pub beta_min: f64,
    /// `f64::INFINITY` for no upper bound (serialised as null).
    #[serde(with = "inf_as_null")]
    pub beta_max: f64,
    pub beta_reg: f64,
    /// What the head reads (artifacts from before this option read the raw state, hence the serde
    /// default; new builds default to `Normalized`).
    #[serde(default)]
    pub head_input: HeadInput,
    /// The head reads the hidden state behind a stop-gradient: the loss trains the head's weights
    /// but cannot move the model's states to raise or lower beta. (Artifacts from before this
    /// option had the joint head, hence the serde default; new builds default to detached.)
    #[serde(default)]
    pub detach_head_input: bool,
    pub loss: LossKind,
    pub label_smoothing: f64,
    /// Standard DPO with this constant beta and no head.
    pub fixed_beta: Option<f64>,
    /// beta-DPO (Wu et al. 2024): a batch-level beta from the batch's margins, and the margin filter.
    #[serde(default)]
    pub beta_dpo: Option<BetaDpoConfig>,
    /// epsilon-DPO (Lee et al. 2025): a per-pair beta from the policy's own perturbation, and a
    /// global beta carried from step to step.
    #[serde(default)]
    pub epsilon_dpo: Option<EpsilonDpoConfig>,
}

/// epsilon-DPO's hyperparameters (oddqueue/e-dpo: `epsilon`, default 0.01, and TRL's `beta`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpsilonDpoConfig {
    /// The global beta before the first step (`--beta-init`).
    pub beta0: f64,
    /// The perturbation size and the step of the KL penalty: a pair's beta is `beta / (1 + eps step)`.
    pub epsilon: f64,
}

impl Default for EpsilonDpoConfig {
    fn default() -> Self {
        EpsilonDpoConfig { beta0: 0.1, epsilon: 0.01 }
    }
}

/// beta-DPO's hyperparameters, named and defaulted as in the paper's reference code
/// (junkangwu/beta-DPO: `loss.beta`, `loss.a`, `loss.mode_weight`, and the 0.9 momentum of
/// `update_and_sync_tensor_mean`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BetaDpoConfig {
    /// beta_0, the base beta the batch beta scales (the deployed model's beta).
    pub beta0: f64,
    /// alpha: beta_batch = beta_0 (1 + alpha (mean kept margin - M_0)).
    pub alpha: f64,
    /// rho: the fraction of each batch the margin filter leaves out.
    pub rho: f64,
    /// Momentum of the moving averages of the margin's mean (M_0) and standard deviation.
    pub momentum: f64,
}

impl Default for BetaDpoConfig {
    fn default() -> Self {
        BetaDpoConfig { beta0: 0.1, alpha: 0.6, rho: 0.2, momentum: 0.9 }
    }
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        ObjectiveConfig {
            beta_source: BetaSource::Prompt,
            beta_aggregate: BetaAggregate::Last,
            beta_init: 0.1,
            beta_min: 0.0,
            beta_max: 2.0,
            beta_reg: 0.0,
            head_input: HeadInput::Normalized,
            detach_head_input: true,
            loss: LossKind::Sigmoid,
            label_smoothing: 0.0,
            fixed_beta: None,
            beta_dpo: None,
            epsilon_dpo: None,
        }
    }
}

impl ObjectiveConfig {
    /// Whether beta comes from the learned head (not a constant, not beta-DPO's batch statistic,
    /// not epsilon-DPO's perturbation).
    pub fn has_head(&self) -> bool {
        self.fixed_beta.is_none() && self.beta_dpo.is_none() && self.epsilon_dpo.is_none()
    }

    // `!(a > b)` on purpose: a NaN flag value must fail these checks too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, detail: String| Err(Error::BadFlag { flag: flag.into(), detail });
        if !(self.beta_init.is_finite() && self.beta_init > 0.0) {
            return bad("--beta-init", format!("{} (must be a positive number)", self.beta_init));
        }
        if !(self.beta_min >= 0.0 && self.beta_min.is_finite()) {
            return bad("--beta-min", format!("{} (must be finite and >= 0)", self.beta_min));
        }
        if !(self.beta_max > self.beta_min) {
            return bad("--beta-max", format!("{} (must be above --beta-min {})", self.beta_max, self.beta_min));
        }
        if !(self.beta_init > self.beta_min && self.beta_init < self.beta_max) {
            return bad("--beta-init", format!("{} (must lie strictly between --beta-min and --beta-max)", self.beta_init));
        }
        if !(self.beta_reg >= 0.0 && self.beta_reg.is_finite()) {
            return bad("--beta-reg", format!("{} (must be finite and >= 0)", self.beta_reg));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return bad("--label-smoothing", format!("{} (must be in [0, 0.5))", self.label_smoothing));
        }
        if let Some(b) = self.fixed_beta {
            if !(b.is_finite() && b > 0.0) {
                return bad("--fixed-beta", format!("{b} (must be a positive number)"));
            }
        }
        if let Some(d) = &self.beta_dpo {
            if self.fixed_beta.is_some() {
                return bad("--beta-method", "beta-dpo and --fixed-beta exclude each other".into());
            }
            if !(d.beta0.is_finite() && d.beta0 > 0.0) {
                return bad("--beta-dpo-beta0", format!("{} (must be a positive number)", d.beta0));
            }
            if !d.alpha.is_finite() {
                return bad("--beta-dpo-alpha", format!("{} (must be finite)", d.alpha));
            }
            if !(0.0..1.0).contains(&d.rho) {
                return bad("--beta-dpo-rho", format!("{} (must be in [0, 1))", d.rho));
            }
            if !(0.0..1.0).contains(&d.momentum) {
                return bad("--beta-dpo-momentum", format!("{} (must be in [0, 1))", d.momentum));
            }
        }
        if let Some(e) = &self.epsilon_dpo {
            if self.fixed_beta.is_some() || self.beta_dpo.is_some() {
                return bad("--beta-method", "epsilon-dpo excludes --fixed-beta and beta-dpo".into());
            }
            if !(e.beta0.is_finite() && e.beta0 > 0.0) {
                return bad("--beta-init", format!("{} (epsilon-DPO's initial beta must be a positive number)", e.beta0));
            }
            // below 1, so that 1 + eps step stays positive for step -1
            if !(e.epsilon > 0.0 && e.epsilon < 1.0) {
                return bad("--epsilon", format!("{} (must be in (0, 1))", e.epsilon));
            }
        }
        Ok(())
    }
}

mod inf_as_null {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
    }
}

/// softplus^-1(y) = log(exp(y) - 1), computed stably.
pub fn inverse_softplus(y: f64) -> f64 {
    if y > 20.0 {
        y
    } else {
        y + (-(-y).exp_m1()).ln()
    }
}
