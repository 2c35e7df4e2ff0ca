//! The three knobs that tell the linear-attention variants apart, and the FLA families built on them.

/// How the state decays each step: `S ← S·exp(g_t)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    /// No decay (`g` absent).
    None,
    /// One log-decay per value head: `g [B,T,HV]` (Gated DeltaNet, simple GLA).
    Head,
    /// One log-decay per key channel: `g [B,T,HV,K]` (KDA, GLA, GDN-2).
    Channel,
}

/// What the erase term `e = Sᵀ(b⊙k)` uses as `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Erase {
    /// No erase (`b = 0`): the GLA family.
    None,
    /// `b = beta [B,T,HV]`, broadcast over K.
    Beta,
    /// `b [B,T,HV,K]`, an erase gate per key channel (GDN-2).
    Channel,
}

/// What multiplies the written value `w⊙v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// `w = 1`.
    One,
    /// `w = beta [B,T,HV]`, broadcast over V.
    Beta,
    /// `w [B,T,HV,V]`, a write gate per value channel (GDN-2).
    Channel,
}

/// An op family: one point in the (decay, erase, write) space, with FLA's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// DeltaNet (`chunk_delta_rule`): no decay, `b = w = beta`.
    DeltaRule,
    /// Gated DeltaNet (`chunk_gated_delta_rule`): scalar decay per head, `b = w = beta`.
    GatedDeltaRule,
    /// Kimi Delta Attention (`chunk_kda`): per-channel decay, `b = w = beta`.
    Kda,
    /// Gated DeltaNet-2 (`chunk_gdn2`): per-channel decay, erase gate over K, write gate over V.
    Gdn2,
    /// Gated linear attention (`chunk_gla`): per-channel decay, no erase.
    Gla,
    /// Simple GLA / RetNet / Lightning (`chunk_simple_gla`): scalar decay per head (optional), no erase.
    SimpleGla,
    /// Plain linear attention (`chunk_linear_attn`, unnormalised): no decay, no erase.
    LinearAttn,
}

impl Family {
    /// Every family, for sweeps.
    pub const ALL: [Family; 7] = [
        Family::DeltaRule,
        Family::GatedDeltaRule,
        Family::Kda,
        Family::Gdn2,
        Family::Gla,
        Family::SimpleGla,
        Family::LinearAttn,
    ];

    /// The decay knob.
    pub fn decay(self) -> Decay {
        match self {
            Family::DeltaRule | Family::LinearAttn => Decay::None,
            Family::GatedDeltaRule | Family::SimpleGla => Decay::Head,
            Family::Kda | Family::Gdn2 | Family::Gla => Decay::Channel,
        }
    }
    /// The erase knob.
    pub fn erase(self) -> Erase {
        match self {
            Family::DeltaRule | Family::GatedDeltaRule | Family::Kda => Erase::Beta,
            Family::Gdn2 => Erase::Channel,
            Family::Gla | Family::SimpleGla | Family::LinearAttn => Erase::None,
        }
    }
    /// The write knob.
    pub fn write(self) -> Write {
        match self {
            Family::DeltaRule | Family::GatedDeltaRule | Family::Kda => Write::Beta,
            Family::Gdn2 => Write::Channel,
            Family::Gla | Family::SimpleGla | Family::LinearAttn => Write::One,
        }
    }
    /// Whether `g` may be omitted (simple GLA without a gate is plain linear attention).
    pub fn gate_optional(self) -> bool {
        self == Family::SimpleGla
    }
    /// The module / FLA family name (`gated_delta_rule`, `kda`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Family::DeltaRule => "delta_rule",
            Family::GatedDeltaRule => "gated_delta_rule",
            Family::Kda => "kda",
            Family::Gdn2 => "gdn2",
            Family::Gla => "gla",
            Family::SimpleGla => "simple_gla",
            Family::LinearAttn => "linear_attn",
        }
    }
    /// The family a kernel fixture's `op` metadata names (`delta`, `gdn`, `kda`, `gdn2`, `gla`).
    pub fn from_fixture_op(op: &str) -> Option<Family> {
        Some(match op {
            "delta" => Family::DeltaRule,
            "gdn" => Family::GatedDeltaRule,
            "kda" => Family::Kda,
            "gdn2" => Family::Gdn2,
            "gla" => Family::Gla,
            "simple_gla" => Family::SimpleGla,
            "linear_attn" => Family::LinearAttn,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
