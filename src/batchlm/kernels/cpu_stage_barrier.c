/* A barrier between the stages of one OpenMP parallel region (cpu_decode_stack.c) that spins for a
 * bounded time before it sleeps.
 *
 * Under OMP_WAIT_POLICY=PASSIVE (batchlm's CPU default, which keeps a loaded machine usable) OpenMP's
 * own barrier puts a waiting thread to sleep at once, and waking it costs tens of microseconds on a
 * virtual CPU: paid at every stage of every layer, that is most of a single request's decode step.
 * Here a waiting thread first polls the barrier's generation with `pause` for up to `spin_ns` (on a
 * quiet machine the other threads arrive well within that), and only then sleeps on a futex, so a
 * thread whose partner lost its core stops burning the core it holds; after a few such waits in one
 * call the rest of the call sleeps at once.
 *
 * The arrival counter and the generation live on separate cache lines; the last thread to arrive
 * resets the counter, then advances the generation and wakes sleepers only when one has said it
 * sleeps (sequentially consistent operations on `generation` and `sleepers` make that handshake safe:
 * a sleeper that announces itself after the wake-up sees the new generation and does not sleep).
 */
#include <immintrin.h>
#include <limits.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

#define SPIN_GIVE_UP 8 /* waits of one call that may outlast the spin before the rest sleep at once */

typedef struct {
    _Alignas(64) atomic_int arrived;
    _Alignas(64) atomic_int generation;
    atomic_int sleepers;
    /* Waits at this barrier (arrivals other than the last) and how many of them slept. */
    atomic_int waits, slept;
    int team;
    long spin_ns;
} StageBarrier;

static void stage_barrier_init(StageBarrier *barrier, int team, long spin_ns) {
    atomic_init(&barrier->arrived, 0);
    atomic_init(&barrier->generation, 0);
    atomic_init(&barrier->sleepers, 0);
    atomic_init(&barrier->waits, 0);
    atomic_init(&barrier->slept, 0);
    barrier->team = team;
    barrier->spin_ns = spin_ns;
}

static long monotonic_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long)now.tv_sec * 1000000000L + now.tv_nsec;
}

/* Spin until the generation moves on from `seen` or spin_ns pass; returns 1 when it moved. */
static int spin_for_generation(StageBarrier *barrier, int seen) {
    if (barrier->spin_ns <= 0) return 0;
    const long deadline = monotonic_ns() + barrier->spin_ns;
    for (;;) {
        for (int i = 0; i < 32; i++) {
            if (atomic_load_explicit(&barrier->generation, memory_order_acquire) != seen) return 1;
            _mm_pause();
        }
        if (monotonic_ns() > deadline) return 0;
    }
}

/* Sleep while *word == seen (or return at once if it no longer is); wake every such sleeper. Without
 * futexes (not Linux) a sleeper yields its core in a loop instead. */
static void sleep_while(atomic_int *word, int seen) {
#ifdef __linux__
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
    (void)word, (void)seen;
    sched_yield();
#endif
}

static void wake_sleepers(atomic_int *word) {
#ifdef __linux__
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)word;
#endif
}

static void stage_barrier_wait(StageBarrier *barrier) {
    if (barrier->team <= 1) return;
    const int seen = atomic_load_explicit(&barrier->generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&barrier->arrived, 1, memory_order_acq_rel) == barrier->team - 1) {
        atomic_store_explicit(&barrier->arrived, 0, memory_order_relaxed);
        atomic_fetch_add(&barrier->generation, 1);
        if (atomic_load(&barrier->sleepers) > 0) wake_sleepers(&barrier->generation);
        return;
    }
    atomic_fetch_add_explicit(&barrier->waits, 1, memory_order_relaxed);
    /* Once a few waits of this call outlasted the spin, the machine is busy: sleep at once. */
    const int spin = atomic_load_explicit(&barrier->slept, memory_order_relaxed) < SPIN_GIVE_UP;
    if (spin && spin_for_generation(barrier, seen)) return;
    atomic_fetch_add_explicit(&barrier->slept, 1, memory_order_relaxed);
    atomic_fetch_add(&barrier->sleepers, 1);
    while (atomic_load(&barrier->generation) == seen) sleep_while(&barrier->generation, seen);
    atomic_fetch_sub(&barrier->sleepers, 1);
}
