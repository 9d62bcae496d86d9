//! Where the routed experts live: [`MoePlacement`], the GPU-resident layer set
//! ([`LayerSet`]) and where the weights come from ([`LoadFormat`]).

use std::fmt;
use std::str::FromStr;

/// Where routed experts run (`moe-placement`; seed env `LVLLM_MOE_NUMA_ENABLED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MoePlacement {
    /// All experts in VRAM when the whole model fits the GPU budget, else hybrid.
    #[default]
    Auto,
    /// Routed experts on the CPU (except GPU-resident layers), the rest on the GPU
    /// (seed env `LVLLM_MOE_NUMA_ENABLED=1`).
    Hybrid,
    /// Everything on the GPU (seed env `LVLLM_MOE_NUMA_ENABLED=0`).
    Gpu,
}

impl FromStr for MoePlacement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(MoePlacement::Auto),
            "hybrid" => Ok(MoePlacement::Hybrid),
            "gpu" => Ok(MoePlacement::Gpu),
            _ => Err(format!("unknown moe placement {s:?} (expected auto, hybrid or gpu)")),
        }
    }
}

impl fmt::Display for MoePlacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MoePlacement::Auto => "auto",
            MoePlacement::Hybrid => "hybrid",
            MoePlacement::Gpu => "gpu",
        })
    }
}

/// Where weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    /// The checkpoint's safetensors.
    #[default]
    Auto,
    /// Deterministic random weights of the shapes `config.json` implies (vLLM's
    /// `load_format: dummy`): benchmarks of real sizes without the weights.
    /// Only the CUDA device builds dummy models.
    Dummy,
}

impl FromStr for LoadFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "safetensors" => Ok(LoadFormat::Auto),
            "dummy" => Ok(LoadFormat::Dummy),
            _ => Err(format!("unknown load format {s:?} (expected auto, safetensors or dummy)")),
        }
    }
}

/// A set of decoder-layer indices written as ranges: `0-5`, `0,1,8-9`, or empty
/// (`gpu-resident-moe-layers`; seed env `LVLLM_GPU_RESIDENT_MOE_LAYERS`).
/// Indices are absolute: in a model whose first layers are dense, those
/// indices simply name no MoE layer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LayerSet(Vec<usize>);

impl LayerSet {
    /// No layers.
    pub fn empty() -> Self {
        LayerSet(Vec::new())
    }

    /// The layers in ascending order, each once.
    pub fn layers(&self) -> &[usize] {
        &self.0
    }

    /// Whether `layer` is in the set.
    pub fn contains(&self, layer: usize) -> bool {
        self.0.binary_search(&layer).is_ok()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The largest index, if any.
    pub fn max(&self) -> Option<usize> {
        self.0.last().copied()
    }
}

impl FromIterator<usize> for LayerSet {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut v: Vec<usize> = iter.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        LayerSet(v)
    }
}

/// Largest layer index a set may name (no model has more layers).
const MAX_LAYER: usize = 1 << 16;

impl FromStr for LayerSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut v = Vec::new();
        let num = |t: &str| -> Result<usize, String> {
            let t = t.trim();
            match t.parse::<usize>() {
                Ok(n) if n <= MAX_LAYER => Ok(n),
                Ok(n) => Err(format!("layer {n} is out of range")),
                Err(_) => Err(format!("{t:?} is not a layer index")),
            }
        };
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(format!("layer range {part:?} runs backwards"));
                    }
                    v.extend(a..=b);
                }
                None => v.push(num(part)?),
            }
        }
        Ok(v.into_iter().collect())
    }
}

impl fmt::Display for LayerSet {
    /// Compact ranges: `0-5,8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.0.len() {
            let mut j = i;
            while j + 1 < self.0.len() && self.0[j + 1] == self.0[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if j > i {
                write!(f, "{}-{}", self.0[i], self.0[j])?;
            } else {
                write!(f, "{}", self.0[i])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_sets_parse_ranges_lists_and_empty() {
        let s: LayerSet = "0-5".parse().unwrap();
        assert_eq!(s.layers(), &[0, 1, 2, 3, 4, 5]);
        let s: LayerSet = "0,1,8-9".parse().unwrap();
        assert_eq!(s.layers(), &[0, 1, 8, 9]);
        assert!(s.contains(8) && !s.contains(7));
        assert_eq!(s.to_string(), "0-1,8-9");
        let s: LayerSet = " 9, 3-4 ,3 ".parse().unwrap();
        assert_eq!(s.to_string(), "3-4,9");
        assert!("".parse::<LayerSet>().unwrap().is_empty());
    }

    #[test]
    fn bad_layer_sets_are_errors_naming_the_part() {
        assert!("5-2".parse::<LayerSet>().unwrap_err().contains("5-2"));
        assert!("a".parse::<LayerSet>().unwrap_err().contains("\"a\""));
        assert!("1-x".parse::<LayerSet>().unwrap_err().contains("\"x\""));
        assert!("0-99999999".parse::<LayerSet>().is_err());
    }

    #[test]
    fn placements_parse_case_insensitively() {
        assert_eq!("HYBRID".parse::<MoePlacement>().unwrap(), MoePlacement::Hybrid);
        assert_eq!("gpu".parse::<MoePlacement>().unwrap().to_string(), "gpu");
        assert!("cpu".parse::<MoePlacement>().unwrap_err().contains("auto, hybrid or gpu"));
        assert_eq!("dummy".parse::<LoadFormat>().unwrap(), LoadFormat::Dummy);
    }
}
