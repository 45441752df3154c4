/* The floor of a forkserver start at the OS level: a small
 * single-threaded C process forks a child that exits at once and waits
 * for it, 2000 times; prints the median in milliseconds. Run it beside
 * `cargo bench --bench spawn` to see how much of a forkserver start is
 * the kernel's fork, exit and wait on the machine at that moment.
 *
 *   gcc -O2 -o /tmp/fork_floor benches/c/fork_floor.c && /tmp/fork_floor
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#define N 2000
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
int main(void) {
    static double s[N];
    for (int i = 0; i < N; i++) {
        double t = now();
        pid_t pid = fork();
        if (pid == 0) _exit(0);
        if (pid < 0) return 1;
        waitpid(pid, NULL, 0);
        s[i] = now() - t;
    }
    qsort(s, N, sizeof s[0], cmp);
    printf("%.3f\n", s[N / 2] * 1e3);
    return 0;
}
