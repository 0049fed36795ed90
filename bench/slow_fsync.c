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

/* Sleep SLOW_SYNC_US (default 10,000), then call the libc function `name`. */
static int delayed(int (**real)(int), const char *name, int fd)
{
    if (!*real)
        *real = (int (*)(int))dlsym(RTLD_NEXT, name);
    const char *text = getenv("SLOW_SYNC_US");
    usleep(text ? (useconds_t)atoi(text) : 10000);
    return (*real)(fd);
}

int fdatasync(int fd)
{
    static int (*real)(int);
    return delayed(&real, "fdatasync", fd);
}

int fsync(int fd)
{
    static int (*real)(int);
    return delayed(&real, "fsync", fd);
}
