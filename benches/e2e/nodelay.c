/* Diagnostic only (benches/e2e.sh): an LD_PRELOAD shim that sets TCP_NODELAY on every TCP
 * socket right before connect(). The daemon is not changed; the benchmark runs it once more with
 * this shim to show how much of the per-mail time is Nagle's algorithm waiting for the peer's
 * delayed ACK (the message and the final "\r\n.\r\n" leave in two send() calls).
 *   cc -shared -fPIC -O2 -o nodelay.so nodelay.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_connect)(int, const struct sockaddr *, socklen_t);
    if (!real_connect)
        real_connect = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    if (addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6)) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return real_connect(fd, addr, len);
}
