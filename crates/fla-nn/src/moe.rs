//! MoE.
