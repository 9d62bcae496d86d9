//! The model loop: the engine's own thread, which owns the [`Scheduler`] and
//! turns its steps into forward batches, samples, detokenizes and sends each
//! request its events.
//!
//! Per iteration: take the queued commands (submit, cancel, shutdown; blocking
//! for one when nothing is in flight), lock the runner (model, KV allocator),
//! schedule a step, run the batch (token ids, positions, block tables; logits of
//! every row when a sequence in it wants prompt logprobs, else of each
//! sequence's last row), then for every sequence whose tokens are all computed
//! sample the next token, check stop conditions, and call its sink. A sink that
//! returns `false` (its receiver is gone) or panics cancels the request; a cancelled or
//! finished request's blocks go back to the allocator at once. A failed forward
//! pass fails the requests of that batch only.
//!
//! Each request's result depends only on its own tokens: sequences never read
//! one another's cache except through shared prefix blocks, which hold the same
//! keys and values the sequence would compute itself (up to float rounding of
//! a different batch shape), and sampling uses the request's own seeded stream.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use lvllm_models::{ForwardBatch, LogitsSelection, SeqSpan};

use crate::engine::{stop_prefix_len, FinishReason, GenerationStats, Runner, Shared, StreamDelta};
use crate::request::{EngineMetrics, RequestEvent};
use crate::sampling::{self, Rng, SamplingParams, TokenLogprobs};
use crate::scheduler::{Scheduler, Step};
use crate::tokenizer::IncrementalDecoder;
use crate::{Error, Result};

/// Where a request's events go; `false` cancels it.
pub(crate) type Sink = Box<dyn FnMut(RequestEvent) -> bool + Send>;

/// A validated request on its way to the model loop.
pub(crate) struct Submission {
    pub(crate) id: u64,
    pub(crate) prompt: Vec<u32>,
    pub(crate) params: SamplingParams,
    /// `max_tokens` capped by the context limit.
    pub(crate) max_new: usize,
    pub(crate) sink: Sink,
}

/// What the engine and handles tell the model loop.
pub(crate) enum Command {
    Submit(Box<Submission>),
    Cancel(u64),
    Shutdown,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Submit(s) => write!(f, "Submit({})", s.id),
            Command::Cancel(id) => write!(f, "Cancel({id})"),
            Command::Shutdown => write!(f, "Shutdown"),
        }
    }
}

/// A request's output state on the model loop.
struct Active<'t> {
    sink: Sink,
    /// Prompt and generated ids, kept when a penalty needs them.
    penalty_tokens: Option<(Vec<u32>, Vec<u32>)>,
    params: SamplingParams,
    rng: Rng,
    decoder: Option<IncrementalDecoder<'t>>,
    prompt_len: usize,
    generated: usize,
    max_new: usize,
    /// Decoded text held back because it may be the start of a stop string.
    pending_text: String,
    prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    stats: GenerationStats,
    started: Option<Instant>,
    first_token: Option<Instant>,
}

impl<'t> Active<'t> {
    fn new(shared: &'t Shared, s: Submission) -> (Self, Vec<u32>) {
        let decoder =
            shared.tokenizer.as_ref().map(|t| t.incremental_decoder_after(&s.prompt, s.params.skip_special_tokens));
        let a = Active {
            sink: s.sink,
            penalty_tokens: s.params.has_penalties().then(|| (s.prompt.clone(), Vec::new())),
            rng: s.params.seed.map(Rng::new).unwrap_or_else(Rng::from_entropy),
            prompt_logprobs: s.params.prompt_logprobs.map(|_| vec![None]),
            params: s.params,
            decoder,
            prompt_len: s.prompt.len(),
            generated: 0,
            max_new: s.max_new,
            pending_text: String::new(),
            stats: GenerationStats { prompt_tokens: s.prompt.len(), ..Default::default() },
            started: None,
            first_token: None,
        };
        (a, s.prompt)
    }

    /// Samples from `logits` and builds the delta; `true` when the request is done.
    fn on_logits(&mut self, logits: &[f32], eos: &[u32]) -> Result<(StreamDelta, bool)> {
        let token = match &mut self.penalty_tokens {
            None => sampling::sample(logits, &self.params, &mut self.rng),
            Some((prompt, output)) => {
                let mut penalized = logits.to_vec();
                sampling::apply_penalties(&mut penalized, &self.params, prompt, output);
                let t = sampling::sample(&penalized, &self.params, &mut self.rng);
                output.push(t);
                t
            }
        };
        // Logprobs are of the raw logits, as vLLM reports them by default.
        let logprobs = self.params.logprobs.map(|k| sampling::logprobs_of(logits, token, k));
        self.generated += 1;
        self.stats.generated_tokens = self.generated;

        let mut finish = None;
        let is_eos = !self.params.ignore_eos && eos.contains(&token);
        if is_eos || self.params.stop_token_ids.contains(&token) {
            finish = Some(FinishReason::Stop);
        }
        if let Some(dec) = self.decoder.as_mut() {
            self.pending_text.push_str(&dec.push(token)?);
            if finish.is_some() || self.generated == self.max_new {
                self.pending_text.push_str(&dec.finish()?);
            }
            if let Some(cut) = self.params.stop.iter().filter_map(|s| self.pending_text.find(s.as_str())).min() {
                self.pending_text.truncate(cut);
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none() && self.generated >= self.max_new {
            finish = Some(FinishReason::Length);
        }
        // Emit all text that can no longer become part of a stop string.
        let keep = if finish.is_some() { 0 } else { stop_prefix_len(&self.pending_text, &self.params.stop) };
        let emit = self.pending_text.len() - keep;
        let text = self.pending_text[..emit].to_string();
        self.pending_text.drain(..emit);
        Ok((StreamDelta { token_id: token, text, logprobs, finish_reason: finish }, finish.is_some()))
    }
}

/// Calls a sink; a panicking sink counts as `false` (its request is
/// cancelled) instead of taking the model loop down.
fn send(sink: &mut Sink, ev: RequestEvent) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink(ev))).unwrap_or(false)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The model loop; returns on [`Command::Shutdown`] or when every sender is gone.
pub(crate) fn model_loop(
    shared: Arc<Shared>,
    runner: Arc<Mutex<Runner>>,
    rx: mpsc::Receiver<Command>,
    metrics: Arc<Mutex<EngineMetrics>>,
) {
    let shared: &Shared = &shared;
    let mut l =
        Loop { shared, sched: Scheduler::new(shared.scheduler), active: HashMap::new(), m: lock(&metrics).to_owned() };
    loop {
        let mut commands = Vec::new();
        if l.sched.is_empty() {
            match rx.recv() {
                Ok(c) => commands.push(c),
                Err(_) => break,
            }
        }
        commands.extend(rx.try_iter());
        let mut guard = lock(&runner);
        let r = &mut *guard;
        let mut shutdown = false;
        for c in commands {
            match c {
                Command::Submit(s) => {
                    let id = s.id;
                    let (a, prompt) = Active::new(shared, *s);
                    l.sched.add(id, prompt, a.params.prompt_logprobs.is_none());
                    l.active.insert(id, a);
                }
                Command::Cancel(id) => l.finish(id, r, None),
                Command::Shutdown => shutdown = true,
            }
        }
        if shutdown {
            let ids: Vec<u64> = l.active.keys().copied().collect();
            for id in ids {
                l.finish(id, r, Some(RequestEvent::Failed(Error::Shutdown)));
            }
        } else if !l.sched.is_empty() {
            l.step(r);
        }
        l.publish(r, &metrics);
        if shutdown {
            break;
        }
    }
}

struct Loop<'t> {
    shared: &'t Shared,
    sched: Scheduler,
    active: HashMap<u64, Active<'t>>,
    m: EngineMetrics,
}

impl<'t> Loop<'t> {
    /// Drops a request (finished, failed or cancelled), freeing its blocks,
    /// after sending it `last` if given.
    fn finish(&mut self, id: u64, r: &mut Runner, last: Option<RequestEvent>) {
        self.sched.remove(id, &mut r.blocks);
        if let Some(mut a) = self.active.remove(&id) {
            if let Some(ev) = last {
                send(&mut a.sink, ev);
            }
            self.m.requests_finished += 1;
        }
    }

    fn publish(&mut self, r: &Runner, metrics: &Mutex<EngineMetrics>) {
        let m = &mut self.m;
        m.num_waiting = self.sched.num_waiting();
        m.num_running = self.sched.num_running();
        m.kv_blocks_used = r.blocks.num_used();
        m.kv_blocks_total = r.blocks.num_blocks();
        m.kv_blocks_cached = r.blocks.num_cached_free();
        let p = self.sched.prefix_cache_stats();
        m.prefix_cache_queried_tokens = p.queried_tokens;
        m.prefix_cache_hit_tokens = p.hit_tokens;
        m.num_preemptions = self.sched.num_preemptions();
        m.peak_running = m.peak_running.max(m.num_running);
        *lock(metrics) = *m;
    }

    fn step(&mut self, r: &mut Runner) {
        let step = self.sched.schedule(&mut r.blocks);
        if step.seqs.is_empty() {
            return;
        }
        let now = Instant::now();
        let n = step.num_tokens();
        self.m.num_steps += 1;
        self.m.peak_batched_tokens = self.m.peak_batched_tokens.max(n);
        self.m.peak_batched_seqs = self.m.peak_batched_seqs.max(step.seqs.len());
        self.m.peak_running = self.m.peak_running.max(self.sched.num_running());
        let mut tokens = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        // Logit rows: every row of a sequence that still needs prompt logprobs,
        // the last row of the others. `sel[k]`: (its first row in the output,
        // whether it has all its rows).
        let (mut rows, mut sel, mut offset) = (Vec::new(), Vec::with_capacity(step.seqs.len()), 0);
        for s in &step.seqs {
            let seq = self.sched.get(s.id).expect("scheduled sequences are known");
            tokens.extend_from_slice(&seq.tokens()[s.start..s.start + s.len]);
            positions.extend(s.start..s.start + s.len);
            let a = self.active.get_mut(&s.id).expect("scheduled sequences are active");
            a.started.get_or_insert(now);
            // Rows before the prompt's last token give prompt logprobs.
            let wants =
                a.prompt_logprobs.as_ref().is_some_and(|v| v.len() < a.prompt_len && s.start + 1 < a.prompt_len);
            sel.push((rows.len(), wants));
            if wants {
                rows.extend(offset..offset + s.len);
            } else {
                rows.push(offset + s.len - 1);
            }
            offset += s.len;
        }
        let all_rows = sel.iter().any(|&(_, w)| w);
        let out = {
            let spans: Vec<SeqSpan<'_>> = step
                .seqs
                .iter()
                .map(|s| SeqSpan {
                    len: s.len,
                    block_table: self.sched.get(s.id).expect("known").blocks(),
                    state_slot: None,
                })
                .collect();
            let logits = if all_rows { LogitsSelection::Rows(&rows) } else { LogitsSelection::LastPerSeq };
            let batch = ForwardBatch { tokens: &tokens, positions: &positions, seqs: &spans, logits };
            r.backend.forward(&batch)
        };
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let msg = e.to_string();
                for s in &step.seqs {
                    self.finish(s.id, r, Some(RequestEvent::Failed(Error::StepFailed(msg.clone()))));
                }
                return;
            }
        };
        let done = self.sched.complete(&step, &mut r.blocks);
        self.after_forward(&step, &done, &out, &sel, r);
    }

    /// Prompt logprobs, sampling, stop checks and events for one step's sequences.
    fn after_forward(
        &mut self,
        step: &Step,
        done: &[bool],
        out: &lvllm_models::Logits,
        sel: &[(usize, bool)],
        r: &mut Runner,
    ) {
        let shared = self.shared;
        let eos = &shared.eos_token_ids;
        for (k, (s, &done)) in step.seqs.iter().zip(done).enumerate() {
            let (first_row, all_rows) = sel[k];
            let last_row = if all_rows { first_row + s.len - 1 } else { first_row };
            let Some(seq) = self.sched.get(s.id) else { continue };
            let a = self.active.get_mut(&s.id).expect("scheduled sequences are active");
            self.m.prompt_tokens_computed += a.prompt_len.min(s.start + s.len).saturating_sub(s.start) as u64;
            if let (Some(v), Some(top)) = (a.prompt_logprobs.as_mut(), a.params.prompt_logprobs) {
                if all_rows {
                    for j in 0..s.len {
                        let p = s.start + j;
                        if p + 1 < a.prompt_len && v.len() == p + 1 {
                            v.push(Some(sampling::logprobs_of(out.row(first_row + j), seq.tokens()[p + 1], top)));
                        }
                    }
                }
            }
            if !done {
                continue;
            }
            let (cached, computed, preempted) =
                (seq.cached_prompt_tokens(), seq.computed_prompt_tokens(), seq.preemptions());
            let now = Instant::now();
            if a.generated == 0 {
                a.first_token = Some(now);
                a.stats.prefill_secs = a.started.map_or(0.0, |t| (now - t).as_secs_f64());
                if let Some(v) = a.prompt_logprobs.take() {
                    if !send(&mut a.sink, RequestEvent::PromptLogprobs(v)) {
                        self.finish(s.id, r, None);
                        continue;
                    }
                }
            } else {
                a.stats.decode_secs = a.first_token.map_or(0.0, |t| (now - t).as_secs_f64());
            }
            a.stats.cached_prompt_tokens = cached;
            a.stats.computed_prompt_tokens = computed;
            a.stats.preemptions = preempted;
            self.m.generation_tokens += 1;
            match a.on_logits(out.row(last_row), eos) {
                Err(e) => self.finish(s.id, r, Some(RequestEvent::Failed(e))),
                Ok((delta, finished)) => {
                    let token = delta.token_id;
                    let keep = send(&mut a.sink, RequestEvent::Delta(delta));
                    if finished {
                        let stats = a.stats;
                        self.finish(s.id, r, Some(RequestEvent::Finished(stats)));
                    } else if !keep {
                        self.finish(s.id, r, None);
                    } else {
                        self.sched.append_token(s.id, token);
                    }
                }
            }
        }
    }
}
