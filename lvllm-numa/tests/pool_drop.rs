//! Dropping a pool joins every worker thread (alone in its own test binary so
//! the process's thread count is not disturbed by other tests).

#[cfg(target_os = "linux")]
#[test]
fn drop_joins_all_workers() {
    use lvllm_numa::{Pool, PoolOptions, Topology};
    let threads_now = || std::fs::read_dir("/proc/self/task").unwrap().count();
    // A joined thread's /proc entry can outlive pthread_join by a moment (the
    // kernel reaps the task after the tid is cleared), so wait briefly for counts.
    let settles_to = |want: usize| {
        for _ in 0..1000 {
            if threads_now() == want {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    };
    let before = threads_now();
    for power_saving in [false, true] {
        let opts = PoolOptions { threads: Some(5), power_saving, ..Default::default() };
        let pool = Pool::new(&Topology::synthetic(2, 3, 1), opts).unwrap();
        assert!(settles_to(before + 5), "{} threads, expected {}", threads_now(), before + 5);
        pool.parallel_for(10, |_, _| {});
        drop(pool);
        assert!(settles_to(before), "{} threads after drop, expected {before}", threads_now());
    }
}
