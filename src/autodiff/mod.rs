//! Reverse-mode differentiation of an ONNX graph into standard ONNX ops.
//!
//! Phases, each in its own module:
//! 1. `activity`: which tensors carry a gradient (float, on a path from a parameter to the loss).
//! 2. `backward`: walk the active nodes in reverse, ask each op's rule for the nodes that compute
//!    its inputs' gradients, and sum contributions where a tensor has several consumers.
//! 3. [`rules`]: one small function per op, registered in one table line per op.
//! 4. `fold`: rewrites across two rules' nodes (transposed products, scatters into sums) and
//!    removal of nodes nothing reads.

mod activity;
mod backward;
mod context;
mod fold;
pub mod rules;

pub use activity::{analyze, Activity, STOP_GRADIENT};
pub use backward::{differentiate, Gradients};
pub use context::RuleCtx;
