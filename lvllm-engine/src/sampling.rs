//! Sampling parameters and the sampler: greedy, temperature, top-k, top-p, min-p,
//! seeded randomness, and logprobs.
//!
//! Order, as in vLLM: temperature scales the logits, min-p drops tokens below
//! `min_p × p_max`, top-k keeps the `k` most likely, top-p keeps the smallest set
//! whose mass reaches `top_p`; then one token is drawn. Temperature 0 is greedy
//! (lowest id wins ties, like `torch.argmax`). Logprobs are always those of the raw
//! model distribution (vLLM's default `raw_logprobs`).

use crate::{Error, Result};

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Most new tokens to generate.
    pub max_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Nucleus sampling mass in (0, 1].
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one, in [0, 1].
    pub min_p: f32,
    /// Seed of this request's random stream (`None`: random).
    pub seed: Option<u64>,
    /// Extra token ids that end generation (kept in the output ids).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation (cut from the output text).
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Return this many top logprobs per generated token (plus the chosen one).
    pub logprobs: Option<usize>,
    /// Return this many top logprobs per prompt token (the first has none).
    pub prompt_logprobs: Option<usize>,
    /// Leave special tokens out of the text.
    pub skip_special_tokens: bool,
    /// Subtracted from the logit of every token already generated (OpenAI
    /// `presence_penalty`, in [-2, 2]).
    pub presence_penalty: f32,
    /// Subtracted once per earlier occurrence in the output (OpenAI
    /// `frequency_penalty`, in [-2, 2]).
    pub frequency_penalty: f32,
    /// Divides positive and multiplies negative logits of every token in the
    /// prompt or the output (HF / vLLM `repetition_penalty`, > 0; 1 = off).
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 16,
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            skip_special_tokens: true,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    /// Sets `max_tokens`.
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }

    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1 (or unset)".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop strings must not be empty".into());
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!("repetition_penalty must be a finite number > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }

    /// Whether any penalty changes the logits.
    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }
}

/// One candidate of a logprobs list.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TopLogprob {
    /// Token id.
    pub id: u32,
    /// Its log-probability.
    pub logprob: f32,
}

/// Logprobs at one position: the chosen token's and the top candidates'.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenLogprobs {
    /// The token at this position.
    pub token_id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// Its rank (1 = most likely).
    pub rank: usize,
    /// The most likely tokens, best first.
    pub top: Vec<TopLogprob>,
}

/// Logprobs of `token` and the `k` best tokens of a logits row.
pub fn logprobs_of(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let mut lp = vec![0f32; logits.len()];
    lvllm_kernels_cpu::ops::log_softmax(logits, &mut lp);
    let chosen = lp[token as usize];
    let rank = 1 + lp.iter().filter(|&&v| v > chosen).count();
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let k = k.min(lp.len());
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
        idx.truncate(k);
        idx.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
    } else {
        idx.clear();
    }
    TokenLogprobs {
        token_id: token,
        logprob: chosen,
        rank,
        top: idx.into_iter().map(|id| TopLogprob { id, logprob: lp[id as usize] }).collect(),
    }
}

/// A small, fast, seedable PRNG (xoshiro256**), one per request.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    /// Seeds the state through SplitMix64.
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    /// A generator seeded from the process's hash randomness and the clock.
    pub fn from_entropy() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
        );
        Rng::new(h.finish())
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest value; the lowest index wins ties.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Applies the penalties of `p` to `logits` in place, as vLLM does: the
/// repetition penalty to every token in `prompt` or `output` (positive logits
/// divided by it, negative ones multiplied), then `frequency_penalty × count`
/// and `presence_penalty` for each token of `output`.
pub fn apply_penalties(logits: &mut [f32], p: &SamplingParams, prompt: &[u32], output: &[u32]) {
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in prompt.iter().chain(output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, &s)| s) {
            *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
}

/// Picks the next token from a logits row.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature == 0.0 || p.top_k == Some(1) {
        return argmax(logits);
    }
    // Probabilities at temperature, in f64 for a stable cumulative sum.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let t = p.temperature as f64;
    let mut cand: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp())).collect();
    let z: f64 = cand.iter().map(|c| c.1).sum();
    for c in &mut cand {
        c.1 /= z;
    }
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.min_p > 0.0 {
        let floor = p.min_p as f64 * cand[0].1;
        cand.retain(|c| c.1 >= floor);
    }
    if let Some(k) = p.top_k {
        cand.truncate(k.max(1));
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = 0;
        for c in &cand {
            keep += 1;
            acc += c.1;
            if acc >= p.top_p as f64 {
                break;
            }
        }
        cand.truncate(keep.max(1));
    }
    let total: f64 = cand.iter().map(|c| c.1).sum();
    let mut u = rng.next_f64() * total;
    for c in &cand {
        u -= c.1;
        if u < 0.0 {
            return c.0;
        }
    }
    cand[cand.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_follow_vllm() {
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut l = vec![4.0, -4.0, 4.0, 1.0, 1.0];
        // Prompt has token 0; output has token 1 twice and token 2 once.
        apply_penalties(&mut l, &p, &[0], &[1, 2, 1]);
        assert_eq!(l, vec![2.0, -8.0 - 0.5 - 0.5, 2.0 - 0.25 - 0.5, 1.0, 1.0]);
        let off = SamplingParams::default();
        let mut same = vec![1.0, 2.0];
        apply_penalties(&mut same, &off, &[0, 1], &[0, 1]);
        assert_eq!(same, vec![1.0, 2.0]);
        assert!(!off.has_penalties() && p.has_penalties());
        for bad in [
            SamplingParams { presence_penalty: 2.5, ..Default::default() },
            SamplingParams { frequency_penalty: -3.0, ..Default::default() },
            SamplingParams { repetition_penalty: 0.0, ..Default::default() },
        ] {
            assert!(bad.validate().is_err());
        }
    }

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(sample(&[0.0, 3.0, 3.0, 1.0], &SamplingParams::greedy(), &mut Rng::new(0)), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_probabilities() {
        let logits = [0.0f32, (3f32).ln(), f32::NEG_INFINITY];
        let p = SamplingParams::default();
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..4000).map(|_| sample(&logits, &p, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let ones = draw(7).iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "p(1) = {ones}");
        assert!(!draw(7).contains(&2));
    }

    #[test]
    fn filters_restrict_the_support() {
        let logits = [3.0f32, 2.9, 1.0, 0.0, -1.0];
        let support = |p: &SamplingParams| {
            let mut rng = Rng::new(1);
            let mut seen: Vec<u32> = (0..500).map(|_| sample(&logits, p, &mut rng)).collect();
            seen.sort();
            seen.dedup();
            seen
        };
        assert_eq!(support(&params(|p| p.top_k = Some(2))), vec![0, 1]);
        assert_eq!(support(&params(|p| p.top_p = 0.5)), vec![0, 1]);
        assert_eq!(support(&params(|p| p.min_p = 0.5)), vec![0, 1]);
        assert_eq!(support(&params(|p| p.top_p = 0.01)), vec![0]);
        assert_eq!(support(&params(|p| p.temperature = 100.0)).len(), 5);
    }

    #[test]
    fn validation_names_the_field() {
        for (p, field) in [
            (params(|p| p.temperature = -1.0), "temperature"),
            (params(|p| p.top_p = 0.0), "top_p"),
            (params(|p| p.min_p = 2.0), "min_p"),
            (params(|p| p.top_k = Some(0)), "top_k"),
            (params(|p| p.max_tokens = 0), "max_tokens"),
            (params(|p| p.stop = vec![String::new()]), "stop"),
        ] {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        assert!(SamplingParams::default().validate().is_ok());
    }

    #[test]
    fn logprobs_rank_and_top() {
        let lp = logprobs_of(&[0.0, 2.0, 1.0], 2, 2);
        assert_eq!(lp.rank, 2);
        assert_eq!(lp.top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![1, 2]);
        let z = (1f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((lp.logprob - (1.0 - z)).abs() < 1e-6);
    }
}
