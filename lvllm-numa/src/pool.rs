//! A NUMA-aware pool of pinned worker threads with a low-latency parallel-for.
//!
//! Axes, each decided in one place:
//! - **how many threads and where**: [`PoolOptions::threads`] (default: physical
//!   cores − [`RESERVED_CORES`], at least 1), apportioned to nodes in proportion to
//!   their physical cores ([`apportion`]); a node that gets no thread is not a pool
//!   node. Pool nodes are numbered `0..num_nodes()` in topology order; use
//!   [`Pool::node_id`] for the kernel id that `Placement::Node` takes.
//! - **pinning**: [`Binding`]. A refused `sched_setaffinity` is recorded
//!   ([`Pool::pinned_threads`]), not fatal.
//! - **scheduling**: [`Pool::parallel_for_nodes`] gives each node its own task
//!   range and its threads steal only from it (one atomic counter per node);
//!   [`Pool::parallel_for`] shares one counter among all threads.
//! - **waiting**: spin with `spin_loop` for up to [`SPIN_BEFORE_PARK`], then sleep
//!   on a condition variable; [`PoolOptions::power_saving`] sleeps at once. After
//!   [`SPIN_WITHOUT_YIELD`] (at once if workers + caller outnumber the process's
//!   CPUs) spinners also yield their core between checks.
//!
//! The calling thread does **not** run tasks: it publishes the job, then waits
//! (spinning, then sleeping) until every worker is done. Workers are pinned, the
//! caller usually is not, so keeping it out keeps every task on its node; the
//! default thread count leaves cores free for it (it drives the GPU).
//!
//! Dispatch allocates nothing: a job is a type-erased pointer to the caller's
//! closure plus per-node counters, published by bumping a generation counter.
//!
//! **Nesting**: calling `parallel_for*` from inside a task of the *same* pool runs
//! the inner loop inline, serially, on the calling worker (its `ctx.thread` is the
//! outer task's, so per-thread scratch keyed on `ctx.thread` is shared by both).
//! A call from another thread while one is in flight waits its turn. Do not build
//! cycles between pools (a task of pool A waiting on pool B whose task waits on A).
//!
//! **Panics** in a task are caught on the worker; the remaining tasks are skipped,
//! and the first panic is re-raised on the calling thread after every worker has
//! stopped, so the pool stays usable.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::ops::Deref;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::topology::Topology;

/// Cores left free by the default thread count: the thread driving the GPU, the
/// OS, and the server's own threads. (The seed's default, kept.)
pub const RESERVED_CORES: usize = 4;

/// How long an idle worker (and a waiting caller) spins before it sleeps. An MoE
/// model calls the pool twice per layer with a few tens of µs of GPU work in
/// between, so 1 ms keeps the workers awake for a whole decode step while a
/// wake-up from sleep (tens of µs) would cost more than the layer's CPU work.
pub const SPIN_BEFORE_PARK: Duration = Duration::from_millis(1);

/// For how long a spinning thread only spins; after this it also calls
/// `sched_yield` between looks at the clock, so that when other processes compete
/// for the cores a spinner hands its core to the thread it waits for instead of
/// holding it for a whole time slice. On an idle core the yield returns at once.
/// A pool whose workers plus the caller outnumber the process's CPUs yields from
/// the start.
pub const SPIN_WITHOUT_YIELD: Duration = Duration::from_micros(10);

/// Spins between two looks at the clock while spinning.
const SPINS_PER_CLOCK_CHECK: u32 = 64;

/// How workers are pinned (the seed's `LK_THREAD_BINDING`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Binding {
    /// `CPU_CORE`: each worker on one physical core's primary CPU (then the SMT
    /// siblings, once every core of the node has a worker; beyond the node's
    /// logical CPUs, workers share CPUs round-robin).
    #[default]
    CpuCore,
    /// `NUMA_NODE`: each worker may run on any CPU of its node.
    NumaNode,
}

/// Options for [`Pool::new`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolOptions {
    /// Number of worker threads; `None` means physical cores − [`RESERVED_CORES`],
    /// at least 1. `Some(0)` is an error.
    pub threads: Option<usize>,
    /// How workers are pinned.
    pub binding: Binding,
    /// Sleep at once when idle instead of spinning for [`SPIN_BEFORE_PARK`]:
    /// no busy CPUs between calls, tens of µs more latency per call.
    pub power_saving: bool,
}

/// Where a task runs: passed to every task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkerCtx {
    /// Index of the worker thread, `0..num_threads()`, node-major (node 0's
    /// threads first). Unique among concurrently running tasks, so it can key
    /// per-thread scratch space.
    pub thread: usize,
    /// The pool node whose task this is (`0..num_nodes()`); for
    /// `parallel_for_nodes` it is the node the task index belongs to.
    pub node: usize,
    /// Index of the worker among its node's threads, `0..threads_on_node(node)`.
    pub thread_in_node: usize,
}

/// Splits `threads` over nodes in proportion to `cores` (D'Hondt: each thread goes
/// to the node with the most cores per thread so far; ties to the lower index).
pub fn apportion(cores: &[usize], threads: usize) -> Vec<usize> {
    let mut alloc = vec![0usize; cores.len()];
    if cores.is_empty() {
        return alloc;
    }
    for _ in 0..threads {
        let best = (0..cores.len())
            .max_by(|&i, &j| {
                // cores[i] / (alloc[i] + 1) versus cores[j] / (alloc[j] + 1), exactly.
                let lhs = cores[i] as u128 * (alloc[j] as u128 + 1);
                let rhs = cores[j] as u128 * (alloc[i] as u128 + 1);
                lhs.cmp(&rhs).then(j.cmp(&i))
            })
            .unwrap_or(0);
        alloc[best] += 1;
    }
    alloc
}

/// A value alone on its cache line(s), so counters of different nodes and the
/// generation word do not false-share (128 bytes: adjacent-line prefetch pairs).
#[repr(align(128))]
#[derive(Default)]
struct CachePadded<T>(T);

impl<T> Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A task range `next..end` that threads claim one index at a time.
#[derive(Default)]
struct TaskQueue {
    next: AtomicUsize,
    end: AtomicUsize,
}

/// Which queue the workers take tasks from.
#[derive(Clone, Copy)]
enum Mode {
    /// Each worker drains its own node's queue.
    PerNode,
    /// All workers drain the global queue.
    Global,
}

/// The type-erased closure of the job in flight.
#[derive(Clone, Copy)]
struct Job {
    /// `&F`, erased.
    data: *const (),
    /// `trampoline::<F>`.
    call: unsafe fn(*const (), &WorkerCtx, usize),
    mode: Mode,
}

/// Calls the erased closure.
///
/// # Safety
/// `data` must point to a live `F`.
unsafe fn trampoline<F: Fn(&WorkerCtx, usize) + Sync>(data: *const (), ctx: &WorkerCtx, task: usize) {
    // SAFETY: guaranteed by the caller: `data` is the `&F` the dispatching call erased,
    // and that call does not return until every worker is done with it.
    let f = unsafe { &*data.cast::<F>() };
    f(ctx, task);
}

/// A do-nothing closure, so even the initial (never run) job is valid.
static NOP: fn(&WorkerCtx, usize) = |_, _| {};

/// State shared by the dispatching thread and the workers.
struct Shared {
    /// Bumped once per job (and once at shutdown); workers wait for it to change.
    generation: CachePadded<AtomicU64>,
    /// Workers that have not finished the current job.
    pending: CachePadded<AtomicUsize>,
    /// The current job. Written only by the dispatching thread while no worker is
    /// between seeing a new generation and decrementing `pending`.
    job: UnsafeCell<Job>,
    /// One queue per pool node.
    queues: Box<[CachePadded<TaskQueue>]>,
    /// The queue of `parallel_for`.
    global: CachePadded<TaskQueue>,
    /// Workers asleep (or about to sleep) on `work_cv`.
    sleepers: AtomicUsize,
    /// Whether the dispatching thread sleeps on `done_cv`.
    caller_parked: AtomicBool,
    shutdown: AtomicBool,
    /// Set when a task panicked during the current job.
    panicked: AtomicBool,
    /// The first panic payload of the current job.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Guards the sleep/wake handshakes of `work_cv` and `done_cv`.
    park_lock: Mutex<()>,
    work_cv: Condvar,
    done_cv: Condvar,
    power_saving: bool,
    /// How long spinners spin before they start yielding their core.
    yield_after: Duration,
}

// SAFETY: every field but `job` is Sync. `job` is an `UnsafeCell` written only by the
// (single, `dispatch`-locked) dispatching thread while no worker reads it: workers read
// it only after observing a new `generation` (Release/Acquire orders the write before),
// and the dispatcher writes the next job only after `pending` reached 0, i.e. after
// every worker finished with the previous one. The pointer it holds is only
// dereferenced under the same protocol (see `trampoline`).
unsafe impl Sync for Shared {}
// SAFETY: as for `Sync`; the raw pointer in `job` is never used by the thread that
// drops `Shared`.
unsafe impl Send for Shared {}

/// Locks a mutex, ignoring poison (the guarded data is `()` or an `Option` that
/// stays valid whatever a panicking holder did).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// On a worker thread: its pool's `Shared` address and its context.
    static CURRENT: Cell<Option<(usize, WorkerCtx)>> = const { Cell::new(None) };
}

/// A pool of pinned worker threads spread over NUMA nodes.
pub struct Pool {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// Serialises dispatches from different threads.
    dispatch: Mutex<()>,
    /// Threads per pool node.
    node_threads: Vec<usize>,
    /// Kernel id of each pool node.
    node_ids: Vec<usize>,
    /// CPUs each worker was asked to run on.
    thread_cpus: Vec<Vec<usize>>,
    pinned: usize,
    topology: Topology,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.handles.len())
            .field("node_threads", &self.node_threads)
            .field("node_ids", &self.node_ids)
            .field("pinned", &self.pinned)
            .field("power_saving", &self.shared.power_saving)
            .finish()
    }
}

impl Pool {
    /// Starts the workers and pins them (see the module docs for placement).
    /// Returns once every worker has started and tried to pin itself.
    pub fn new(topology: &Topology, opts: PoolOptions) -> Result<Pool> {
        let threads = match opts.threads {
            Some(0) => return Err(Error::ZeroThreads),
            Some(n) => n,
            None => topology.num_physical_cores().saturating_sub(RESERVED_CORES).max(1),
        };
        let cores: Vec<usize> = topology.nodes().iter().map(|n| n.cores.len()).collect();
        let alloc = apportion(&cores, threads);
        let mut node_threads = Vec::new();
        let mut node_ids = Vec::new();
        let mut thread_cpus = Vec::new();
        let mut ctxs = Vec::new();
        for (node, &count) in topology.nodes().iter().zip(&alloc).filter(|(_, &c)| c > 0) {
            let pool_node = node_ids.len();
            for k in 0..count {
                let cpus = match opts.binding {
                    Binding::NumaNode => node.cpus.clone(),
                    Binding::CpuCore => {
                        let core = &node.cores[k % node.cores.len()];
                        vec![core.cpus[(k / node.cores.len()) % core.cpus.len()]]
                    }
                };
                thread_cpus.push(cpus);
                ctxs.push(WorkerCtx { thread: ctxs.len(), node: pool_node, thread_in_node: k });
            }
            node_threads.push(count);
            node_ids.push(node.id);
        }
        let shared = Arc::new(Shared {
            generation: CachePadded(AtomicU64::new(0)),
            pending: CachePadded(AtomicUsize::new(0)),
            job: UnsafeCell::new(Job {
                data: (&NOP as *const fn(&WorkerCtx, usize)).cast::<()>(),
                call: trampoline::<fn(&WorkerCtx, usize)>,
                mode: Mode::Global,
            }),
            queues: (0..node_ids.len()).map(|_| CachePadded::default()).collect(),
            global: CachePadded::default(),
            sleepers: AtomicUsize::new(0),
            caller_parked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            panic: Mutex::new(None),
            park_lock: Mutex::new(()),
            work_cv: Condvar::new(),
            done_cv: Condvar::new(),
            power_saving: opts.power_saving,
            yield_after: if threads + 1 > usable_cpus() { Duration::ZERO } else { SPIN_WITHOUT_YIELD },
        });
        let mut pool = Pool {
            shared,
            handles: Vec::with_capacity(threads),
            dispatch: Mutex::new(()),
            node_threads,
            node_ids,
            thread_cpus,
            pinned: 0,
            topology: topology.clone(),
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        for ctx in ctxs {
            let shared = Arc::clone(&pool.shared);
            let cpus = pool.thread_cpus[ctx.thread].clone();
            let ready = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("lvllm-n{}-{}", ctx.node, ctx.thread_in_node))
                .spawn(move || worker_main(shared, ctx, cpus, ready));
            match spawned {
                Ok(h) => pool.handles.push(h),
                // Dropping `pool` shuts down and joins the workers already started.
                Err(e) => return Err(Error::Spawn(e)),
            }
        }
        drop(ready_tx);
        pool.pinned = ready_rx.iter().filter(|&pinned| pinned).count();
        Ok(pool)
    }

    /// Number of worker threads (the calling thread is not one).
    pub fn num_threads(&self) -> usize {
        self.handles.len()
    }

    /// Number of pool nodes: topology nodes that received at least one worker.
    pub fn num_nodes(&self) -> usize {
        self.node_ids.len()
    }

    /// Workers on pool node `node` (0 for a node index out of range).
    pub fn threads_on_node(&self, node: usize) -> usize {
        self.node_threads.get(node).copied().unwrap_or(0)
    }

    /// Kernel NUMA id of pool node `node` (for `Placement::Node`), `None` if out of range.
    pub fn node_id(&self, node: usize) -> Option<usize> {
        self.node_ids.get(node).copied()
    }

    /// How many workers the kernel let us pin (all of them, unless in a restricted
    /// container or with a synthetic topology naming CPUs that do not exist).
    pub fn pinned_threads(&self) -> usize {
        self.pinned
    }

    /// CPUs worker `thread` was pinned to (or asked to be), `None` if out of range.
    pub fn thread_cpus(&self, thread: usize) -> Option<&[usize]> {
        self.thread_cpus.get(thread).map(Vec::as_slice)
    }

    /// The topology the pool was built from.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Runs `f(ctx, task)` for every task of every node and returns when all are
    /// done: node `n`'s tasks are `0..tasks_per_node[n]` and run only on node `n`'s
    /// workers, which claim them dynamically (stealing only within the node).
    /// `ctx.node` tells `f` which node's task it is.
    ///
    /// # Panics
    /// If `tasks_per_node.len() != self.num_nodes()` (see
    /// [`Pool::try_parallel_for_nodes`]), and re-raises the first panic of `f`.
    pub fn parallel_for_nodes<F: Fn(&WorkerCtx, usize) + Sync>(&self, tasks_per_node: &[usize], f: F) {
        if let Err(e) = self.try_parallel_for_nodes(tasks_per_node, f) {
            panic!("parallel_for_nodes: {e}");
        }
    }

    /// [`Pool::parallel_for_nodes`], returning [`Error::NodeCountMismatch`] instead
    /// of panicking when `tasks_per_node` has the wrong length (nothing runs then).
    pub fn try_parallel_for_nodes<F: Fn(&WorkerCtx, usize) + Sync>(
        &self,
        tasks_per_node: &[usize],
        f: F,
    ) -> Result<()> {
        if tasks_per_node.len() != self.num_nodes() {
            return Err(Error::NodeCountMismatch { expected: self.num_nodes(), got: tasks_per_node.len() });
        }
        if tasks_per_node.iter().all(|&t| t == 0) {
            return Ok(());
        }
        if let Some(ctx) = self.current_worker() {
            for (node, &tasks) in tasks_per_node.iter().enumerate() {
                let ctx =
                    WorkerCtx { node, thread_in_node: if node == ctx.node { ctx.thread_in_node } else { 0 }, ..ctx };
                (0..tasks).for_each(|t| f(&ctx, t));
            }
            return Ok(());
        }
        let _turn = lock(&self.dispatch);
        for (q, &tasks) in self.shared.queues.iter().zip(tasks_per_node) {
            q.next.store(0, Ordering::Relaxed);
            q.end.store(tasks, Ordering::Relaxed);
        }
        self.run(&f, Mode::PerNode);
        Ok(())
    }

    /// Runs `f(ctx, task)` for tasks `0..n` on all workers regardless of node (one
    /// shared counter, dynamic scheduling) and returns when all are done.
    ///
    /// # Panics
    /// Re-raises the first panic of `f`.
    pub fn parallel_for<F: Fn(&WorkerCtx, usize) + Sync>(&self, n: usize, f: F) {
        if n == 0 {
            return;
        }
        if let Some(ctx) = self.current_worker() {
            (0..n).for_each(|t| f(&ctx, t));
            return;
        }
        let _turn = lock(&self.dispatch);
        self.shared.global.next.store(0, Ordering::Relaxed);
        self.shared.global.end.store(n, Ordering::Relaxed);
        self.run(&f, Mode::Global);
    }

    /// Whether the calling thread is one of this pool's workers (a parallel call
    /// from it runs its tasks inline, node after node).
    pub fn is_worker_thread(&self) -> bool {
        self.current_worker().is_some()
    }

    /// The context of the calling thread if it is one of this pool's workers.
    fn current_worker(&self) -> Option<WorkerCtx> {
        let me = Arc::as_ptr(&self.shared) as usize;
        CURRENT.with(|c| c.get()).filter(|&(pool, _)| pool == me).map(|(_, ctx)| ctx)
    }

    /// Publishes the job, waits for every worker, re-raises a task's panic.
    /// Called with `self.dispatch` held and the queues set.
    fn run<F: Fn(&WorkerCtx, usize) + Sync>(&self, f: &F, mode: Mode) {
        let sh = &*self.shared;
        // SAFETY: we hold `dispatch`, so no other dispatcher exists, and the previous
        // job finished (`pending` was 0 when it returned), so no worker reads `job`.
        unsafe {
            *sh.job.get() = Job { data: (f as *const F).cast::<()>(), call: trampoline::<F>, mode };
        }
        sh.pending.store(self.handles.len(), Ordering::Relaxed);
        // SeqCst (not just Release) pairs with the sleepers' handshake in `wait_for_job`.
        sh.generation.fetch_add(1, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = lock(&sh.park_lock);
            sh.work_cv.notify_all();
        }
        // `f` must stay alive until every worker is done with it: wait, whatever happens.
        wait_until_done(sh);
        if sh.panicked.swap(false, Ordering::Acquire) {
            if let Some(payload) = lock(&sh.panic).take() {
                resume_unwind(payload);
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let sh = &*self.shared;
        sh.shutdown.store(true, Ordering::SeqCst);
        sh.generation.fetch_add(1, Ordering::SeqCst);
        {
            let _g = lock(&sh.park_lock);
            sh.work_cv.notify_all();
        }
        for h in self.handles.drain(..) {
            // A worker never unwinds (tasks run under `catch_unwind`); nothing to report.
            let _ = h.join();
        }
    }
}

/// CPUs this process may run on (its affinity mask), for the oversubscription check.
fn usable_cpus() -> usize {
    crate::sys::allowed_cpus()
        .map(|c| c.len())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Spins (unless power saving) then sleeps until `pending` reaches 0.
fn wait_until_done(sh: &Shared) {
    if !sh.power_saving && spin_until(sh.yield_after, || sh.pending.load(Ordering::Acquire) == 0) {
        return;
    }
    let mut g = lock(&sh.park_lock);
    sh.caller_parked.store(true, Ordering::SeqCst);
    while sh.pending.load(Ordering::SeqCst) != 0 {
        g = sh.done_cv.wait(g).unwrap_or_else(PoisonError::into_inner);
    }
    sh.caller_parked.store(false, Ordering::Relaxed);
}

/// Spins on `ready` for up to [`SPIN_BEFORE_PARK`], yielding the core between
/// checks after `yield_after`; returns whether it became true.
#[inline]
fn spin_until(yield_after: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..SPINS_PER_CLOCK_CHECK {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        let waited = start.elapsed();
        if waited >= SPIN_BEFORE_PARK {
            return ready();
        }
        if waited >= yield_after {
            std::thread::yield_now();
        }
    }
}

/// Waits for a generation other than `seen` and returns it.
fn wait_for_job(sh: &Shared, seen: u64) -> u64 {
    if !sh.power_saving {
        let mut g = seen;
        if spin_until(sh.yield_after, || {
            g = sh.generation.load(Ordering::Acquire);
            g != seen
        }) {
            return g;
        }
    }
    let mut guard = lock(&sh.park_lock);
    sh.sleepers.fetch_add(1, Ordering::SeqCst);
    loop {
        // With the dispatcher's SeqCst bump-then-check, either it sees us in
        // `sleepers` (and notifies under the lock, after we wait) or we see its bump.
        let g = sh.generation.load(Ordering::SeqCst);
        if g != seen {
            sh.sleepers.fetch_sub(1, Ordering::SeqCst);
            return g;
        }
        guard = sh.work_cv.wait(guard).unwrap_or_else(PoisonError::into_inner);
    }
}

/// Body of a worker thread.
fn worker_main(shared: Arc<Shared>, ctx: WorkerCtx, cpus: Vec<usize>, ready: mpsc::Sender<bool>) {
    let pinned = crate::sys::pin_current_thread(&cpus);
    // The receiver lives until every worker reported; a failed send cannot happen.
    let _ = ready.send(pinned);
    drop(ready);
    let sh = &*shared;
    CURRENT.with(|c| c.set(Some((sh as *const Shared as usize, ctx))));
    let mut seen = 0;
    loop {
        seen = wait_for_job(sh, seen);
        if sh.shutdown.load(Ordering::Acquire) {
            break;
        }
        // SAFETY: we observed the new generation with Acquire, after the dispatcher
        // wrote `job`; it will not write again until we decrement `pending` below.
        let job = unsafe { *sh.job.get() };
        let queue = match job.mode {
            Mode::PerNode => &sh.queues[ctx.node],
            Mode::Global => &sh.global,
        };
        drain(sh, queue, &job, &ctx);
        // Release: our tasks' writes are visible to the dispatcher once it sees 0.
        if sh.pending.fetch_sub(1, Ordering::SeqCst) == 1 && sh.caller_parked.load(Ordering::SeqCst) {
            let _g = lock(&sh.park_lock);
            sh.done_cv.notify_one();
        }
    }
}

/// Claims and runs tasks from `queue` until it is empty or a task panicked.
fn drain(sh: &Shared, queue: &TaskQueue, job: &Job, ctx: &WorkerCtx) {
    let end = queue.end.load(Ordering::Relaxed);
    loop {
        let task = queue.next.fetch_add(1, Ordering::Relaxed);
        if task >= end || sh.panicked.load(Ordering::Relaxed) {
            return;
        }
        // SAFETY: `job` is the current job; its closure outlives this call because the
        // dispatcher waits for `pending` to reach 0, which we decrement only after.
        let result = catch_unwind(AssertUnwindSafe(|| unsafe { (job.call)(job.data, ctx, task) }));
        if let Err(payload) = result {
            let mut slot = lock(&sh.panic);
            if slot.is_none() {
                *slot = Some(payload);
            }
            sh.panicked.store(true, Ordering::Release);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apportion_is_proportional() {
        assert_eq!(apportion(&[4, 4], 4), vec![2, 2]);
        assert_eq!(apportion(&[4, 4], 3), vec![2, 1]);
        assert_eq!(apportion(&[1; 8], 4), vec![1, 1, 1, 1, 0, 0, 0, 0]);
        assert_eq!(apportion(&[12, 4], 8), vec![6, 2]);
        assert_eq!(apportion(&[2, 2], 9), vec![5, 4]);
        assert_eq!(apportion(&[], 3), Vec::<usize>::new());
        assert_eq!(apportion(&[3], 0), vec![0]);
    }
}
