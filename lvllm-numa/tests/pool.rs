//! Pool behaviour: every task exactly once on its node's workers, placement of
//! threads over nodes, nesting, panics, sleeping and power-saving waits,
//! concurrent callers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use lvllm_numa::{Binding, Error, Pool, PoolOptions, Topology, WorkerCtx, SPIN_BEFORE_PARK};

fn pool(nodes: usize, cores: usize, smt: usize, threads: Option<usize>) -> Pool {
    Pool::new(&Topology::synthetic(nodes, cores, smt), PoolOptions { threads, ..Default::default() }).unwrap()
}

/// xorshift64*, so the "random" task counts are reproducible.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// First global thread index of each node, plus the total.
fn node_starts(p: &Pool) -> Vec<usize> {
    let mut starts = vec![0];
    for n in 0..p.num_nodes() {
        starts.push(starts[n] + p.threads_on_node(n));
    }
    starts
}

/// Runs `tasks` through `parallel_for_nodes` and checks each ran once, on a worker
/// of its node, with a consistent context.
fn check_per_node(p: &Pool, tasks: &[usize]) {
    let starts = node_starts(p);
    let counts: Vec<Vec<AtomicUsize>> = tasks.iter().map(|&t| (0..t).map(|_| AtomicUsize::new(0)).collect()).collect();
    let bad = Mutex::new(Vec::new());
    p.parallel_for_nodes(tasks, |ctx: &WorkerCtx, t| {
        counts[ctx.node][t].fetch_add(1, Ordering::Relaxed);
        let name = std::thread::current().name().unwrap_or("").to_string();
        let ok = ctx.thread >= starts[ctx.node]
            && ctx.thread < starts[ctx.node + 1]
            && ctx.thread_in_node == ctx.thread - starts[ctx.node]
            && name == format!("lvllm-n{}-{}", ctx.node, ctx.thread_in_node);
        if !ok {
            bad.lock().unwrap().push((*ctx, name));
        }
    });
    assert!(bad.lock().unwrap().is_empty(), "tasks ran off their node: {:?}", bad.lock().unwrap());
    for (n, c) in counts.iter().enumerate() {
        for (t, c) in c.iter().enumerate() {
            assert_eq!(c.load(Ordering::Relaxed), 1, "node {n} task {t}");
        }
    }
}

#[test]
fn every_task_runs_once_on_its_node() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for (nodes, cores, smt, threads) in [(2, 4, 2, None), (2, 4, 2, Some(7)), (8, 1, 1, Some(8)), (3, 2, 1, Some(2))] {
        let p = pool(nodes, cores, smt, threads);
        for _ in 0..150 {
            // Often 0 tasks on a node, often fewer tasks than threads.
            let tasks: Vec<usize> = (0..p.num_nodes()).map(|_| [0, 1, 2, rng.below(40)][rng.below(4)]).collect();
            check_per_node(&p, &tasks);
        }
        check_per_node(&p, &vec![0; p.num_nodes()]);
    }
}

#[test]
fn parallel_for_runs_every_task_once() {
    let p = pool(2, 2, 1, Some(3));
    let mut rng = Rng(99);
    for _ in 0..200 {
        let n = [0, 1, 2, 3, rng.below(500)][rng.below(5)];
        let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        p.parallel_for(n, |ctx, t| {
            assert!(ctx.thread < 3 && ctx.node < 2);
            counts[t].fetch_add(1, Ordering::Relaxed);
        });
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
    }
}

#[test]
fn threads_spread_over_nodes_by_physical_cores() {
    let p = pool(2, 4, 2, None); // 8 physical cores - 4 reserved
    assert_eq!((p.num_threads(), p.num_nodes()), (4, 2));
    assert_eq!((p.threads_on_node(0), p.threads_on_node(1), p.threads_on_node(2)), (2, 2, 0));
    assert_eq!(pool(1, 2, 1, None).num_threads(), 1, "never fewer than one");
    // Fewer threads than nodes: only nodes with a worker are pool nodes.
    let p = pool(8, 1, 1, Some(3));
    assert_eq!(p.num_nodes(), 3);
    assert_eq!((p.node_id(0), p.node_id(2), p.node_id(3)), (Some(0), Some(2), None));
    // CpuCore: one primary CPU per worker, SMT siblings only once every core has one.
    let p = pool(1, 2, 2, Some(4));
    let cpus: Vec<&[usize]> = (0..4).map(|t| p.thread_cpus(t).unwrap()).collect();
    assert_eq!(cpus, vec![&[0][..], &[1], &[2], &[3]]);
    // NumaNode: the whole node.
    let topo = Topology::synthetic(2, 2, 2);
    let p =
        Pool::new(&topo, PoolOptions { threads: Some(2), binding: Binding::NumaNode, power_saving: false }).unwrap();
    assert_eq!(p.thread_cpus(1).unwrap(), &topo.nodes()[1].cpus[..]);
    assert!(matches!(
        Pool::new(&topo, PoolOptions { threads: Some(0), ..Default::default() }),
        Err(Error::ZeroThreads)
    ));
}

#[test]
fn wrong_node_count_is_an_error_or_a_documented_panic() {
    let p = pool(2, 1, 1, Some(2));
    let r = p.try_parallel_for_nodes(&[1, 2, 3], |_, _| {});
    assert!(matches!(r, Err(Error::NodeCountMismatch { expected: 2, got: 3 })));
    assert!(catch_unwind(AssertUnwindSafe(|| p.parallel_for_nodes(&[1], |_, _| {}))).is_err());
}

#[test]
fn nested_calls_run_inline() {
    let p = pool(2, 2, 1, Some(4));
    let inner = AtomicUsize::new(0);
    p.parallel_for_nodes(&[3, 2], |outer, _| {
        p.parallel_for(5, |ctx, _| {
            assert_eq!(ctx.thread, outer.thread, "inline on the same worker");
            inner.fetch_add(1, Ordering::Relaxed);
        });
        p.parallel_for_nodes(&[1, 2], |ctx, t| {
            assert!(ctx.node < 2 && t < 2);
            inner.fetch_add(1, Ordering::Relaxed);
        });
    });
    assert_eq!(inner.into_inner(), 5 * 8);
}

#[test]
fn panics_reach_the_caller_and_the_pool_survives() {
    let p = pool(2, 2, 1, Some(4));
    for round in 0..3 {
        let r = catch_unwind(AssertUnwindSafe(|| {
            p.parallel_for(100, |_, t| {
                if t == 37 {
                    panic!("task {t} failed");
                }
            })
        }));
        let msg = r.expect_err("the panic must propagate");
        assert_eq!(msg.downcast_ref::<String>().map(String::as_str), Some("task 37 failed"), "round {round}");
        // Per node, and from a nested call.
        let r = catch_unwind(AssertUnwindSafe(|| {
            p.parallel_for_nodes(&[2, 2], |ctx, t| {
                if ctx.node == 1 && t == 1 {
                    p.parallel_for(1, |_, _| panic!("inner"));
                }
            })
        }));
        assert_eq!(r.expect_err("nested panic").downcast_ref::<&str>(), Some(&"inner"));
        check_per_node(&p, &[5, 5]);
    }
}

#[test]
fn sleeping_workers_and_caller_wake_up() {
    for power_saving in [false, true] {
        let topo = Topology::synthetic(2, 2, 1);
        let p = Pool::new(&topo, PoolOptions { threads: Some(3), binding: Binding::CpuCore, power_saving }).unwrap();
        for _ in 0..3 {
            // Workers go to sleep...
            std::thread::sleep(SPIN_BEFORE_PARK * 3);
            check_per_node(&p, &[4, 4]);
            // ... and the caller sleeps while a task takes long.
            let hits = AtomicUsize::new(0);
            p.parallel_for(3, |_, _| {
                std::thread::sleep(SPIN_BEFORE_PARK * 2);
                hits.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(hits.into_inner(), 3);
        }
        // Many quick calls: no lost wake-up between spinning and sleeping.
        let total = AtomicUsize::new(0);
        for i in 0..2000 {
            p.parallel_for_nodes(&[i % 3, 1], |_, _| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(total.into_inner(), (0..2000).map(|i| i % 3 + 1).sum::<usize>());
    }
}

#[test]
fn concurrent_callers_take_turns() {
    let p = pool(2, 2, 1, Some(2));
    let total = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..200 {
                    p.parallel_for_nodes(&[2, 3], |_, _| {
                        total.fetch_add(1, Ordering::Relaxed);
                    });
                }
            });
        }
    });
    assert_eq!(total.into_inner(), 3 * 200 * 5);
}

#[test]
fn pools_are_send_and_sync_and_drop_while_asleep() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pool>();
    assert_send_sync::<lvllm_numa::HostBuffer>();
    let p = pool(1, 2, 1, Some(2));
    p.parallel_for(4, |_, _| {});
    std::thread::sleep(Duration::from_millis(5));
    drop(p); // joins parked workers
    let p = pool(1, 2, 1, Some(2));
    drop(p); // joins spinning workers that never ran a job
}
