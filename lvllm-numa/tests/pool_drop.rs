//! Dropping a pool joins every worker thread (alone in its own test binary so
//! the process's thread count is not disturbed by other tests).

#[cfg(target_os = "linux")]
#[test]
fn drop_joins_all_workers() {
    use lvllm_numa::{Pool, PoolOptions, Topology};
    let threads_now = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let before = threads_now();
    for power_saving in [false, true] {
        let opts = PoolOptions { threads: Some(5), power_saving, ..Default::default() };
        let pool = Pool::new(&Topology::synthetic(2, 3, 1), opts).unwrap();
        assert_eq!(threads_now(), before + 5);
        pool.parallel_for(10, |_, _| {});
        drop(pool);
        assert_eq!(threads_now(), before);
    }
}
