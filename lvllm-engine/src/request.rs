//! What a submitted request hands back: [`RequestHandle`] (a blocking receiver
//! of [`StreamDelta`]s, `Send + 'static`), the [`RequestEvent`]s a sink
//! receives, and the engine-wide [`EngineMetrics`].

use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::Duration;

use crate::engine::{GenerationStats, StreamDelta};
use crate::sampling::TokenLogprobs;
use crate::worker::Command;
use crate::{Error, Result};

/// Identifies a submitted request (unique per engine, increasing in submission order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One event of a request, in this order: [`PromptLogprobs`](Self::PromptLogprobs)
/// (only when asked for), a [`Delta`](Self::Delta) per generated token (the last
/// with a finish reason), then [`Finished`](Self::Finished); or
/// [`Failed`](Self::Failed) at any point, which is also the last event.
#[derive(Debug)]
pub enum RequestEvent {
    /// Logprobs of every prompt token (the first is `None`), once the prompt is computed.
    PromptLogprobs(Vec<Option<TokenLogprobs>>),
    /// A generated token.
    Delta(StreamDelta),
    /// The request ended normally; its final statistics.
    Finished(GenerationStats),
    /// The request failed (a forward pass or detokenization error, or the
    /// engine shut down).
    Failed(Error),
}

/// Counters of the scheduler and the KV cache, updated after every engine step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct EngineMetrics {
    /// Requests waiting to be scheduled (new or preempted).
    pub num_waiting: usize,
    /// Requests running (holding KV blocks).
    pub num_running: usize,
    /// KV blocks held by requests.
    pub kv_blocks_used: usize,
    /// KV blocks in the cache.
    pub kv_blocks_total: usize,
    /// Free blocks still holding a cached prefix (reusable until evicted).
    pub kv_blocks_cached: usize,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_cache_queried_tokens: u64,
    /// Of those, tokens found there and not computed.
    pub prefix_cache_hit_tokens: u64,
    /// Prompt tokens run through the model (recomputes included).
    pub prompt_tokens_computed: u64,
    /// Tokens generated.
    pub generation_tokens: u64,
    /// Preemptions (a running request's blocks dropped to be recomputed later).
    pub num_preemptions: u64,
    /// Engine steps (forward passes) run.
    pub num_steps: u64,
    /// Requests finished (completed, failed or cancelled).
    pub requests_finished: u64,
    /// Most requests running at once so far (≤ `max_num_seqs`).
    pub peak_running: usize,
    /// Most tokens in one forward batch so far (≤ `max_num_batched_tokens`).
    pub peak_batched_tokens: usize,
    /// Most sequences in one forward batch so far.
    pub peak_batched_seqs: usize,
}

/// A submitted request: receives its [`StreamDelta`]s from the model loop.
/// `Send + 'static`; dropping it before the end cancels the request.
///
/// [`recv`](Self::recv) blocks for the next delta and returns `None` after the
/// last one (and after [`Finished`](RequestEvent::Finished) filled in the
/// final [`stats`](Self::stats)); it is also the [`Iterator`] impl.
#[derive(Debug)]
pub struct RequestHandle {
    id: RequestId,
    rx: mpsc::Receiver<RequestEvent>,
    commands: mpsc::Sender<Command>,
    prompt_token_ids: Vec<u32>,
    prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    stats: GenerationStats,
    finished: bool,
}

impl RequestHandle {
    pub(crate) fn new(
        id: RequestId,
        rx: mpsc::Receiver<RequestEvent>,
        commands: mpsc::Sender<Command>,
        prompt_token_ids: Vec<u32>,
    ) -> Self {
        let stats = GenerationStats { prompt_tokens: prompt_token_ids.len(), ..Default::default() };
        RequestHandle { id, rx, commands, prompt_token_ids, prompt_logprobs: None, stats, finished: false }
    }

    /// The request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The prompt as token ids.
    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.prompt_token_ids
    }

    /// Prompt logprobs, when asked for, once received (before the first delta).
    pub fn prompt_logprobs(&self) -> Option<&[Option<TokenLogprobs>]> {
        self.prompt_logprobs.as_deref()
    }

    /// Takes the prompt logprobs out of the handle.
    pub fn take_prompt_logprobs(&mut self) -> Option<Vec<Option<TokenLogprobs>>> {
        self.prompt_logprobs.take()
    }

    /// Statistics so far: prompt and generated token counts while running, the
    /// full [`GenerationStats`] once finished.
    pub fn stats(&self) -> GenerationStats {
        self.stats
    }

    /// Whether the request has ended (every delta received, or failed, or cancelled).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Cancels the request: no more deltas; its KV blocks are freed at the
    /// model loop's next step.
    pub fn cancel(&mut self) {
        if !self.finished {
            self.finished = true;
            let _ = self.commands.send(Command::Cancel(self.id.0));
        }
    }

    /// Blocks for the next delta; `None` once the request has ended.
    pub fn recv(&mut self) -> Option<Result<StreamDelta>> {
        while !self.finished {
            let ev = self.rx.recv();
            if let Some(r) = self.handle(ev.map_err(|_| ())) {
                return Some(r);
            }
        }
        None
    }

    /// Waits at most `timeout` for the next delta; `None` on timeout or once
    /// the request has ended (tell them apart with [`is_finished`](Self::is_finished)).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Result<StreamDelta>> {
        let Some(deadline) = std::time::Instant::now().checked_add(timeout) else {
            // Beyond any representable instant: wait as long as it takes.
            return self.recv();
        };
        while !self.finished {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ev = match self.rx.recv_timeout(left) {
                Ok(ev) => Ok(ev),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => Err(()),
            };
            if let Some(r) = self.handle(ev) {
                return Some(r);
            }
        }
        None
    }

    /// The next delta if one is ready; `None` if none is, or once the request
    /// has ended (tell them apart with [`is_finished`](Self::is_finished)).
    pub fn try_recv(&mut self) -> Option<Result<StreamDelta>> {
        while !self.finished {
            let ev = match self.rx.try_recv() {
                Ok(ev) => Ok(ev),
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => Err(()),
            };
            if let Some(r) = self.handle(ev) {
                return Some(r);
            }
        }
        None
    }

    /// Folds one event into the handle; `Some` when it is for the caller.
    fn handle(&mut self, ev: std::result::Result<RequestEvent, ()>) -> Option<Result<StreamDelta>> {
        match ev {
            Ok(RequestEvent::PromptLogprobs(v)) => {
                self.prompt_logprobs = Some(v);
                None
            }
            Ok(RequestEvent::Delta(d)) => {
                self.stats.generated_tokens += 1;
                Some(Ok(d))
            }
            Ok(RequestEvent::Finished(s)) => {
                self.stats = s;
                self.finished = true;
                None
            }
            Ok(RequestEvent::Failed(e)) => {
                self.finished = true;
                Some(Err(e))
            }
            Err(()) => {
                self.finished = true;
                Some(Err(Error::Shutdown))
            }
        }
    }
}

impl Iterator for RequestHandle {
    type Item = Result<StreamDelta>;

    fn next(&mut self) -> Option<Self::Item> {
        self.recv()
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_static<T: Send + 'static>() {}

    #[test]
    fn handle_is_send_static() {
        assert_send_static::<RequestHandle>();
        assert_send_static::<RequestEvent>();
    }
}
