//! Fused ops with their own backward, used where a profile showed candle's generic autograd to
//! be the bottleneck. Each is tested against the plain tensor path (values and gradients).

mod lora_linear;

pub(crate) use lora_linear::{FrozenLinearOp, LoraLinearOp};
