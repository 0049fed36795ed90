/* A slow disk for the benchmarks: every fsync and fdatasync of the process sleeps first.

   Edge machines often write to SD cards or eMMC, where a sync takes milliseconds; this
   VM's disk syncs in a fraction of one. Build and use (nothing else builds or loads it):

     gcc -shared -fPIC -O2 -o /tmp/slow_fsync.so bench/slow_fsync.c -ldl
     LD_PRELOAD=/tmp/slow_fsync.so SLOW_SYNC_US=10000 \
         .venv/bin/python bench/bench_daemon.py --events 30000 --paced-seconds 8

   The daemon inherits LD_PRELOAD from the benchmark; SLOW_SYNC_US is the added delay in
   microseconds (default 10,000). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>

static useconds_t added_delay(void)
{
    const char *text = getenv("SLOW_SYNC_US");
    return text ? (useconds_t)atoi(text) : 10000;
}

int fdatasync(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    usleep(added_delay());
    return real(fd);
}

int fsync(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    usleep(added_delay());
    return real(fd);
}
