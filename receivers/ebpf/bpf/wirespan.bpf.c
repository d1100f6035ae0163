// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
// wirespan eBPF probe: the bytes every traced process reads from and writes to
// its TCP sockets, and the UDP datagrams it sends and receives on chosen ports,
// seen at the syscall boundary.
//
// Contract with receivers/ebpf/receiver.py (keep struct rec_hdr in sync with
// HDR there):
// - syscalls tracepoints only (kprobes are not compiled into the target kernel,
//   fentry/fexit are refused there: design.md §6);
// - enter: filter by pid and comm, resolve the fd to a TCP socket through
//   task->files->fdt, filter by port, remember the user buffer(s) keyed by
//   pid_tgid;
// - exit: copy min(ret, cfg.max_call_bytes) bytes into
//   ring-buffer records of at most CHUNK payload bytes, each carrying the
//   socket, 4-tuple, pid/tid/comm, direction, timestamps, the syscall's total
//   byte count and the record's offset in it; bytes not copied are counted as
//   truncated and userspace turns them into a gap;
// - close(): one CLOSE record for a TCP socket this program reported data for
//   (preceded by a TLS_CLOSE record when TLS plaintext was reported for it);
// - OpenSSL (issue 15): uprobes on SSL_read/SSL_write/SSL_read_ex/SSL_write_ex
//   (entry and return) copy the plaintext into TLS_DATA records, which carry the
//   same header as syscall records, positions counted per socket apart from the
//   syscall bytes. The SSL* is tied to its socket by the read/write syscall the
//   call makes on the same thread (or SSL_set_fd), remembered per (SSL*, pid) for
//   calls served from OpenSSL's buffer. A syscall made inside an SSL call moves
//   ciphertext: it is counted, not copied, and marks the socket as TLS so its
//   later syscall payloads are skipped too. sched_process_exec sends an EXEC
//   record so userspace can attach to libraries of processes started later.
// - UDP (cfg.udp): read/write/recvfrom/sendto/recvmsg/sendmsg and recvmmsg/sendmmsg
//   (glibc's resolver sends its A and AAAA queries with one sendmmsg) on a UDP socket
//   whose local or peer port is in udp_port_filter (the peer from the call's address,
//   msg_name, or the connected socket's): one K_DGRAM record per datagram, its peer in
//   raddr/rport, at most CHUNK bytes of its first iovec (a longer datagram is counted
//   C_UDP_TRUNC and userspace drops it); at most MAX_MMSG datagrams per mmsg call. Only
//   those ports' datagrams reach the ring: a node's other UDP (QUIC, syslog) costs a
//   table lookup per call. A receive on an unconnected socket learns its peer at exit, so
//   it is remembered at entry and decided then.
// Every loop and every variable-size copy is clamped to a constant bound, as
// the verifier requires.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define CHUNK 16384          // payload bytes per ring-buffer record (issue 9)
#define HALF (CHUNK / 2)     // a record gathering small iovecs takes pieces of at most this
#define MAX_IOV 1024         // iovecs followed per readv/writev/recvmsg/sendmsg (UIO_MAXIOV)
#define MAX_RECORDS 64       // records per syscall: 64 * 16 KiB = 1 MiB hard bound
#define MAX_FDS_BITS 20      // fd numbers above 2^20 are not followed
#define RINGBUF_HDR 8        // BPF_RINGBUF_HDR_SZ: the kernel's per-record header
#define AF_INET 2
#define AF_INET6 10
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define MSG_PEEK 2
#define MAX_MMSG 8           // datagrams reported per recvmmsg/sendmmsg call

// Odd ops write. The mmsg ops are followed on UDP sockets only.
enum op { WS_READ = 0, WS_WRITE = 1, WS_READV = 2, WS_WRITEV = 3, WS_RECVMSG = 4, WS_SENDMSG = 5,
	  WS_RECVMMSG = 6, WS_SENDMMSG = 7 };
enum kind { K_DATA = 0, K_CLOSE = 1, K_TLS_DATA = 2, K_TLS_CLOSE = 3, K_EXEC = 4, K_DGRAM = 5 };
enum counter {
	C_RESERVE_FAIL = 0,  // bpf_ringbuf_output failed (ring full, or see C_RESERVE_FAIL_ROOM): record lost
	C_TRUNC_CALLS = 1,   // syscalls with bytes beyond max_call_bytes
	C_TRUNC_BYTES = 2,   // those bytes
	C_RECORDS = 3,       // records written
	C_READ_FAIL = 4,     // bpf_probe_read_user failed (page not present)
	C_ACTIVE_FULL = 5,   // the in-flight syscall table was full
	C_RESERVE_FAIL_ROOM = 6,  // of C_RESERVE_FAIL: the ring had room for the record
	C_TLS_CIPHER_CALLS = 7,   // syscalls on TLS sockets (ciphertext): counted, not copied
	C_TLS_CIPHER_BYTES = 8,   // their bytes
	C_TLS_CALLS = 9,          // SSL_read/SSL_write calls reported (plaintext)
	C_TLS_NO_SOCK_CALLS = 10, // SSL calls with data but no known socket (memory BIO, ...): not reported
	C_TLS_NO_SOCK_BYTES = 11, // their bytes
	C_UDP_DGRAMS = 12,        // UDP datagrams reported (K_DGRAM records)
	C_UDP_TRUNC = 13,         // of those, longer than what was copied (CHUNK, or their first iovec)
	N_COUNTERS = 14,
};

struct ws_cfg {
	u32 self_pid;        // never trace the receiver itself (it exports over TCP)
	u32 filter_pids;     // 1: only pids in pid_filter
	u32 filter_comms;    // 1: only comms in comm_filter
	u32 filter_ports;    // 1: only sockets whose local or remote port is in port_filter
	u32 max_call_bytes;  // bytes copied per syscall (<= MAX_RECORDS * CHUNK)
	u32 tls;             // 1: the OpenSSL uprobes are attached (syscalls look for an SSL call)
	u32 udp;             // 1: UDP datagrams on udp_port_filter's ports are reported
};

struct rec_hdr {
	u64 ts_enter;        // bpf_ktime_get_ns at syscall entry
	u64 ts_exit;         // at exit
	u64 sock;            // struct sock address: the connection's identity in this process
	u32 pid;
	u32 tid;
	u32 total;           // bytes the syscall moved
	u32 offset;          // of this record's payload within them
	u32 len;             // payload bytes in this record
	u16 lport;           // local port (host order)
	u16 rport;           // remote port (host order)
	u8 kind;             // enum kind (K_TLS_DATA: plaintext returned by / given to an SSL call)
	u8 egress;           // 1: the process wrote these bytes
	u8 family;
	u8 last;             // 1: the last record of this syscall
	u32 pad;
	u8 laddr[16];
	u8 raddr[16];
	char comm[16];
	u64 stream_off;      // bytes this process moved in this direction on this socket before this syscall
	                     // (K_CLOSE: bytes it sent in all); TLS records count plaintext bytes apart
	u64 recv_end;        // K_CLOSE: bytes it received in all; 0 in data records. With stream_off, lost
	                     // tail records (the ring was full to the end) become positioned gaps too.
};

struct record {
	struct rec_hdr h;
	u8 data[CHUNK];      // at most CHUNK bytes, gathered from as many iovecs as it takes
};

struct active {
	u64 sock;
	u64 buf;             // user buffer, or iovec array for the vector ops (mmsghdr array for mmsg)
	u64 ts;
	u64 name;            // UDP: the call's struct sockaddr (sendto/recvfrom address, msg_name), or 0
	u32 cnt;             // iovec count for the vector ops
	u8 op;
	u8 tls;              // 1: made inside an SSL call (ciphertext)
	u8 udp;              // 1: a UDP socket
	u8 matched;          // UDP: a port already matched udp_port_filter (else decided per datagram)
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 20);  // userspace sets the configured size before load
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, u64);
	__type(value, struct active);
} active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct record);
} scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, N_COUNTERS);
	__type(key, u32);
	__type(value, u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct ws_cfg);
} ws_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, u32);
	__type(value, u8);
} pid_filter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, char[16]);
	__type(value, u8);
} comm_filter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, u16);
	__type(value, u8);
} port_filter SEC(".maps");

// UDP ports whose datagrams are reported (either end).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, u16);
	__type(value, u8);
} udp_port_filter SEC(".maps");

// Sockets this program has reported data for, per process. close() of one of
// them is reported even when the port filter no longer matches: a socket that
// reached TCP_CLOSE has had its local port cleared (inet_put_port).
struct seen_key {
	u64 sock;
	u32 pid;
	u32 pad;
};

// Per socket and process: bytes sent and received so far. Records carry the
// position, so userspace sees bytes lost to a full ring as a hole, not as
// silently spliced streams.
struct seen_val {
	u64 bytes[2];        // [0] received, [1] sent
	u64 tls_bytes[2];    // plaintext through SSL calls: [0] read, [1] written
	u64 flags;           // SEEN_TLS: an SSL call used this socket, its syscall payloads are ciphertext
};

#define SEEN_TLS 1

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct seen_key);
	__type(value, struct seen_val);
} seen SEC(".maps");

// An SSL_read/SSL_write call in flight on a thread (entry to return).
struct ssl_call {
	u64 ssl;             // the SSL*
	u64 buf;             // the plaintext buffer
	u64 len_ptr;         // _ex variants: size_t *readbytes / *written (the count is there, ret is 1)
	u64 sock;            // the TCP socket it uses (0 until known)
	u64 ts;
	u8 egress;           // 1: SSL_write
	u8 ex;
	u8 io;               // 1: the call made a syscall on a TCP socket (a socket BIO)
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);  // LRU: a call that never returns (thread gone) ages out
	__uint(max_entries, 16384);
	__type(key, u64);    // pid_tgid
	__type(value, struct ssl_call);
} ssl_calls SEC(".maps");

struct ssl_key {
	u64 ssl;
	u32 pid;
	u32 pad;
};

// SSL* -> the socket its last syscall (or SSL_set_fd) used, for calls OpenSSL serves
// from its buffer without a syscall. An SSL* reused for a new connection is bound
// again by the first syscall of its first call (a new connection always makes one).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ssl_key);
	__type(value, u64);
} ssl_socks SEC(".maps");

// SSL_do_handshake/SSL_connect/SSL_accept in flight on a thread: pid_tgid -> SSL*.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, u64);
	__type(value, u64);
} ssl_hs SEC(".maps");

// An SSL* whose last call on this thread made no socket I/O (a memory BIO: Node.js, asyncio):
// its output is written by the thread's next write to a TCP socket outside an SSL call.
struct ssl_pending {
	u64 ssl;
	u64 ts;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, u64);
	__type(value, struct ssl_pending);
} ssl_pending SEC(".maps");

// A write this long after the SSL call is not taken for its output.
#define PENDING_BIND_NS 100000000ULL

static __always_inline void bind_ssl(u64 ssl, u32 pid, struct sock *sk)
{
	struct ssl_key k = { .ssl = ssl, .pid = pid };
	u64 skv = (u64)sk;
	bpf_map_update_elem(&ssl_socks, &k, &skv, BPF_ANY);
}

// Do the bytes a write is about to send start with a TLS record header (type 20-23, major 3)?
static __always_inline bool starts_tls_record(u64 buf, bool vec)
{
	if (vec) {
		struct iovec v = {};
		if (bpf_probe_read_user(&v, sizeof(v), (void *)buf))
			return false;
		buf = (u64)v.iov_base;
	}
	u8 b[2] = {};
	if (bpf_probe_read_user(b, sizeof(b), (void *)buf))
		return false;
	return b[0] >= 20 && b[0] <= 23 && b[1] == 3;
}

static __always_inline void count(u32 idx, u64 n)
{
	u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += n;  // per-CPU slot: no atomics needed
}

// Every record goes out through here. A failed reservation is counted, and
// counted again when the ring still had room for the record: a full ring means
// the consumer fell behind, a failure with room means something else refused it
// (it was a consumer position read as 0 while userspace rewrote it: issue 9).
static __always_inline void rb_output(void *data, u64 size)
{
	if (!bpf_ringbuf_output(&events, data, size, 0)) {
		count(C_RECORDS, 1);
		return;
	}
	count(C_RESERVE_FAIL, 1);
	u64 need = (size + RINGBUF_HDR + 7) & ~7ULL;
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) + need < bpf_ringbuf_query(&events, BPF_RB_RING_SIZE))
		count(C_RESERVE_FAIL_ROOM, 1);
}

static __always_inline struct ws_cfg *get_config(void)
{
	u32 zero = 0;
	return bpf_map_lookup_elem(&ws_config, &zero);
}

// Process-level filters, checked at entry before any map write.
static __always_inline bool want_process(struct ws_cfg *cfg, u32 pid)
{
	if (pid == cfg->self_pid)
		return false;
	if (cfg->filter_pids && !bpf_map_lookup_elem(&pid_filter, &pid))
		return false;
	if (cfg->filter_comms) {
		char comm[16] = {};
		bpf_get_current_comm(comm, sizeof(comm));
		if (!bpf_map_lookup_elem(&comm_filter, comm))
			return false;
	}
	return true;
}

// fd -> struct sock of a TCP (*udp = 0) or UDP (*udp = 1) socket (IPv4/IPv6), else NULL.
static __always_inline struct sock *fd_to_inet_sock(u64 fd, u8 *udp)
{
	if (fd >= (1 << MAX_FDS_BITS))
		return NULL;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
	struct files_struct *files = BPF_CORE_READ(task, files);
	if (!files)
		return NULL;
	struct fdtable *fdt = BPF_CORE_READ(files, fdt);
	if (!fdt)
		return NULL;
	if (fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *f = NULL;
	if (bpf_core_read(&f, sizeof(f), &fds[fd]) || !f)
		return NULL;
	struct inode *ino = BPF_CORE_READ(f, f_inode);
	if (!ino)
		return NULL;
	umode_t mode = BPF_CORE_READ(ino, i_mode);
	if ((mode & S_IFMT) != S_IFSOCK)
		return NULL;
	struct socket *so = BPF_CORE_READ(f, private_data);
	if (!so)
		return NULL;
	struct sock *sk = BPF_CORE_READ(so, sk);
	if (!sk)
		return NULL;
	u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return NULL;
	u16 proto = BPF_CORE_READ(sk, sk_protocol), type = BPF_CORE_READ(sk, sk_type);
	if (proto == IPPROTO_TCP && type == SOCK_STREAM) {
		*udp = 0;
		return sk;
	}
	if (proto == IPPROTO_UDP && type == SOCK_DGRAM) {
		*udp = 1;
		return sk;
	}
	return NULL;
}

// fd -> struct sock of a TCP socket (IPv4/IPv6), else NULL.
static __always_inline struct sock *fd_to_tcp_sock(u64 fd)
{
	u8 udp = 0;
	struct sock *sk = fd_to_inet_sock(fd, &udp);
	return udp ? NULL : sk;
}

static __always_inline bool udp_port(u16 port)
{
	return port && bpf_map_lookup_elem(&udp_port_filter, &port);
}

// The destination port of a struct sockaddr (AF_INET or AF_INET6: the port is at the same place), or 0.
static __always_inline u16 sockaddr_port(u64 name)
{
	struct { u16 family; u16 port; } sa = {};
	if (!name || bpf_probe_read_user(&sa, sizeof(sa), (void *)name))
		return 0;
	if (sa.family != AF_INET && sa.family != AF_INET6)
		return 0;
	return __builtin_bswap16(sa.port);
}

// Entry of a call on a UDP socket: remembered when a port matches, or when the datagrams'
// peers are learned later (a receive on an unconnected socket, sendmmsg's per-message names).
static __always_inline int on_enter_udp(struct ws_cfg *cfg, u64 id, struct sock *sk, u64 buf, u32 cnt, u8 op,
					u64 name)
{
	if (!cfg->udp)
		return 0;
	u16 lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	u16 rport = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
	u8 matched = udp_port(lport) || udp_port(rport);
	if (!matched) {
		if (op & 1) {
			if (op == WS_SENDMMSG) {
				if (rport)
					return 0;  // connected: every datagram goes to rport
			} else if (!udp_port(sockaddr_port(name))) {
				return 0;
			} else {
				matched = 1;
			}
		} else if (rport) {
			return 0;  // connected: every datagram comes from rport
		}
	}
	struct active a = {
		.sock = (u64)sk, .buf = buf, .ts = bpf_ktime_get_ns(), .name = name, .cnt = cnt, .op = op, .udp = 1,
		.matched = matched,
	};
	if (bpf_map_update_elem(&active, &id, &a, BPF_ANY))
		count(C_ACTIVE_FULL, 1);
	return 0;
}

static __always_inline void fill_tuple(struct rec_hdr *h, struct sock *sk)
{
	h->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	h->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	h->rport = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (h->family == AF_INET) {
		__builtin_memset(h->laddr, 0, 16);
		__builtin_memset(h->raddr, 0, 16);
		bpf_core_read(h->laddr, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_core_read(h->raddr, 4, &sk->__sk_common.skc_daddr);
	} else {
		bpf_core_read(h->laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(h->raddr, 16, &sk->__sk_common.skc_v6_daddr);
	}
}

static __always_inline int on_enter(u64 fd, u64 buf, u32 cnt, u8 op, u64 name)
{
	struct ws_cfg *cfg = get_config();
	if (!cfg)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	if (!want_process(cfg, id >> 32))
		return 0;
	u8 udp = 0;
	struct sock *sk = fd_to_inet_sock(fd, &udp);
	if (!sk)
		return 0;
	if (udp)
		return on_enter_udp(cfg, id, sk, buf, cnt, op, name);
	if (op >= WS_RECVMMSG)
		return 0;
	u8 tls = 0;
	if (cfg->tls) {
		// inside an SSL call on this thread: this syscall moves its ciphertext, and the
		// socket is the SSL*'s (bound before the port filter: the SSL call's return applies it)
		struct ssl_call *sc = bpf_map_lookup_elem(&ssl_calls, &id);
		if (sc) {
			tls = 1;
			sc->io = 1;
			if (sc->sock != (u64)sk) {
				sc->sock = (u64)sk;
				bind_ssl(sc->ssl, id >> 32, sk);
			}
		} else {
			u64 *hs = bpf_map_lookup_elem(&ssl_hs, &id);
			if (hs) {
				bind_ssl(*hs, id >> 32, sk);  // a socket BIO inside a handshake
			} else if (op & 1) {
				// a memory BIO (Node.js, asyncio): the SSL* whose last call on this thread left
				// output is written by the thread's next write to a TCP socket, if it is TLS
				struct ssl_pending *pd = bpf_map_lookup_elem(&ssl_pending, &id);
				if (pd) {
					struct ssl_pending pend = *pd;
					bpf_map_delete_elem(&ssl_pending, &id);
					if (bpf_ktime_get_ns() - pend.ts < PENDING_BIND_NS && starts_tls_record(buf, op >= WS_READV))
						bind_ssl(pend.ssl, id >> 32, sk);
				}
			}
		}
	}
	if (cfg->filter_ports) {
		// decide here, so filtered-out syscalls cost no map update/delete
		u16 lport = BPF_CORE_READ(sk, __sk_common.skc_num);
		u16 rport = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
		if (!bpf_map_lookup_elem(&port_filter, &lport) && !bpf_map_lookup_elem(&port_filter, &rport)) {
			struct seen_key sk_key = { .sock = (u64)sk, .pid = id >> 32 };
			if (!bpf_map_lookup_elem(&seen, &sk_key))
				return 0;
		}
	}
	struct active a = {
		.sock = (u64)sk, .buf = buf, .ts = bpf_ktime_get_ns(), .cnt = cnt, .op = op, .tls = tls,
	};
	if (bpf_map_update_elem(&active, &id, &a, BPF_ANY))
		count(C_ACTIVE_FULL, 1);
	return 0;
}

// sendmsg/recvmsg: the iovec array lives in the user's struct msghdr.
static __always_inline int on_enter_msg(u64 fd, u64 umsg, u8 op)
{
	struct user_msghdr m = {};
	if (bpf_probe_read_user(&m, sizeof(m), (void *)umsg))
		return 0;
	return on_enter(fd, (u64)m.msg_iov, (u32)m.msg_iovlen, op, (u64)m.msg_name);
}

// Lives in a per-CPU map, not on the stack: the verifier does not track map
// contents, so each bpf_loop iteration looks the same to it and verification
// converges (stack scalars that change every iteration made it explode).
struct copy_ctx {
	u64 ubuf;            // user buffer or iovec array
	u64 base;            // current user pointer
	u64 avail;           // bytes left at base
	u32 cnt;             // iovec count
	u32 iov_i;
	u32 want;            // bytes to copy in all
	u32 done;
	u32 vec;
	u32 fill;            // bytes gathered into the current record
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct copy_ctx);
} copy_state SEC(".maps");

// Send the record gathered so far (its payload starts at done - fill in the syscall).
static __always_inline void flush_record(struct copy_ctx *c, struct record *r)
{
	u64 fill = *(volatile u32 *)&c->fill;
	if (fill == 0)
		return;
	asm volatile("%[n] += -1\n\t%[n] &= 0x3fff\n\t%[n] += 1" : [n] "+r"(fill));
	r->h.len = fill;
	r->h.offset = c->done - c->fill;
	r->h.last = c->done >= c->want;
	c->fill = 0;
	rb_output(r, sizeof(struct rec_hdr) + fill);
}

// One step of the copy: the next piece of the current iovec into the record being
// gathered (sent when it holds CHUNK bytes or the copy is done), or a move to the next
// iovec. Small iovecs (gRPC writes a header block as two dozen of them) share records.
// Returns 1 to stop.
static long copy_step(u32 i, void *arg)
{
	u32 zero = 0;
	struct copy_ctx *c = bpf_map_lookup_elem(&copy_state, &zero);
	if (!c)
		return 1;
	struct record *r = bpf_map_lookup_elem(&scratch, &zero);
	if (!r)
		return 1;
	if (c->done >= c->want) {
		flush_record(c, r);
		return 1;
	}
	if (c->avail == 0) {
		c->iov_i++;
		if (!c->vec || c->iov_i >= c->cnt || c->iov_i >= MAX_IOV) {
			flush_record(c, r);
			return 1;
		}
		struct iovec v = {};
		if (bpf_probe_read_user(&v, sizeof(v), (void *)(c->ubuf + (u64)c->iov_i * sizeof(struct iovec)))) {
			flush_record(c, r);
			return 1;
		}
		c->base = (u64)v.iov_base;
		c->avail = v.iov_len;
		return 0;
	}
	u64 n = c->want - c->done;
	if (n > c->avail)
		n = c->avail;
	// The first piece of a record goes at offset 0 and may fill it (a large buffer keeps
	// full records); later pieces are at most HALF at an offset below HALF (the record
	// is sent once it holds HALF), so both copies are provably inside data[CHUNK]. The
	// verifier needs those bounds on the very registers passed to the helper, so they are
	// clamped in asm where clang cannot move the checks to a copy; going through the map
	// value first stops precision tracking there (else done/avail/want become precise
	// and the bpf_loop callback states never converge).
	long err;
	if (c->fill == 0) {
		if (n > CHUNK)
			n = CHUNK;
		r->h.len = n;
		u64 sz = *(volatile u32 *)&r->h.len;
		asm volatile("%[n] += -1\n\t%[n] &= 0x3fff\n\t%[n] += 1" : [n] "+r"(sz));
		err = bpf_probe_read_user(r->data, sz, (void *)c->base);
	} else {
		if (n > HALF)
			n = HALF;
		r->h.len = n;
		u64 sz = *(volatile u32 *)&r->h.len;
		asm volatile("%[n] += -1\n\t%[n] &= 0x1fff\n\t%[n] += 1" : [n] "+r"(sz));
		u64 off = *(volatile u32 *)&c->fill;
		asm volatile("%[o] &= 0x1fff" : [o] "+r"(off));
		err = bpf_probe_read_user(r->data + off, sz, (void *)c->base);
	}
	if (err) {
		count(C_READ_FAIL, 1);
		flush_record(c, r);
		return 1;
	}
	c->done += n;
	c->fill += n;
	c->base += n;
	c->avail -= n;
	if (c->fill >= HALF || c->done >= c->want)
		flush_record(c, r);
	return 0;
}

// One syscall's (K_DATA) or SSL call's (K_TLS_DATA) bytes into ring records. buf is
// the user buffer, or the iovec array when vec; ret the bytes moved. A syscall on a
// TLS socket (inside an SSL call, or on a socket an SSL call used) is counted and
// its position kept, but not copied: those bytes are ciphertext.
static __always_inline int emit_data(u64 id, u64 sock, u64 buf, u32 cnt, u8 vec, u64 ts, long ret, u8 egress,
				     u8 kind, u8 in_ssl)
{
	struct ws_cfg *cfg = get_config();
	u32 zero = 0;
	struct record *r = bpf_map_lookup_elem(&scratch, &zero);
	if (!cfg || !r)
		return 0;
	struct sock *sk = (struct sock *)sock;
	struct seen_key sk_key = { .sock = sock, .pid = id >> 32 };
	struct seen_val *sv = bpf_map_lookup_elem(&seen, &sk_key);
	if (!sv) {
		// the port filter was applied at entry
		struct seen_val zero_sv = {};
		bpf_map_update_elem(&seen, &sk_key, &zero_sv, BPF_NOEXIST);
		sv = bpf_map_lookup_elem(&seen, &sk_key);
		if (!sv)
			return 0;
	}
	u32 total = ret > 0x7fffffff ? 0x7fffffff : (u32)ret;
	egress &= 1;
	if (kind == K_DATA && (in_ssl || (sv->flags & SEEN_TLS))) {
		sv->flags |= SEEN_TLS;
		__sync_fetch_and_add(&sv->bytes[egress], (u64)total);
		count(C_TLS_CIPHER_CALLS, 1);
		count(C_TLS_CIPHER_BYTES, total);
		return 0;
	}
	struct rec_hdr *h = &r->h;
	fill_tuple(h, sk);
	h->ts_enter = ts;
	h->ts_exit = bpf_ktime_get_ns();
	h->sock = sock;
	h->pid = id >> 32;
	h->tid = (u32)id;
	h->total = total;
	h->kind = kind;
	h->egress = egress;
	h->last = 0;
	h->pad = 0;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
	if (kind == K_TLS_DATA) {
		sv->flags |= SEEN_TLS;
		h->stream_off = __sync_fetch_and_add(&sv->tls_bytes[egress], (u64)total);
		count(C_TLS_CALLS, 1);
	} else {
		h->stream_off = __sync_fetch_and_add(&sv->bytes[egress], (u64)total);
	}
	h->recv_end = 0;

	u32 want = total;
	u32 limit = cfg->max_call_bytes;
	if (limit > MAX_RECORDS * CHUNK)
		limit = MAX_RECORDS * CHUNK;
	if (want > limit) {
		count(C_TRUNC_CALLS, 1);
		count(C_TRUNC_BYTES, want - limit);
		want = limit;
	}

	struct copy_ctx *c = bpf_map_lookup_elem(&copy_state, &zero);
	if (!c)
		return 0;
	c->ubuf = buf;
	c->cnt = cnt;
	c->iov_i = 0;
	c->want = want;
	c->done = 0;
	c->fill = 0;
	c->vec = vec;
	if (c->vec) {
		struct iovec v = {};
		if (cnt == 0 || bpf_probe_read_user(&v, sizeof(v), (void *)buf))
			return 0;
		c->base = (u64)v.iov_base;
		c->avail = v.iov_len;
	} else {
		c->base = buf;
		c->avail = want;
	}
	// bpf_loop: the step is verified once, not once per iteration
	// at most one step per iovec to reach it, one per (iovec, record) piece to copy
	bpf_loop(MAX_RECORDS + 2 * MAX_IOV, copy_step, NULL, 0);
	u32 done = c->done;
	if (done < want) {
		// could not copy everything (iovec bound, fault): a zero-length last
		// record tells userspace how much is missing
		h->offset = done;
		h->len = 0;
		h->last = 1;
		rb_output(r, sizeof(struct rec_hdr));
	}
	return 0;
}

// One UDP datagram (K_DGRAM): ubuf/avail its bytes (the buffer, or its first iovec), total its
// length; name the peer's struct sockaddr, when the call gave one.
static __always_inline void emit_dgram(u64 id, struct sock *sk, u64 ubuf, u64 avail, u64 total, u64 name,
				       u8 egress, u64 ts, u8 matched)
{
	u32 zero = 0;
	struct record *r = bpf_map_lookup_elem(&scratch, &zero);
	if (!r)
		return;
	struct rec_hdr *h = &r->h;
	fill_tuple(h, sk);
	if (name) {
		struct sockaddr_in6 sa = {};  // sin6_family and sin6_port are where sin_family/sin_port are
		if (!bpf_probe_read_user(&sa, sizeof(struct sockaddr_in), (void *)name)) {
			if (sa.sin6_family == AF_INET && h->family == AF_INET) {
				h->rport = __builtin_bswap16(sa.sin6_port);
				__builtin_memset(h->raddr, 0, 16);
				__builtin_memcpy(h->raddr, &((struct sockaddr_in *)&sa)->sin_addr, 4);
			} else if (sa.sin6_family == AF_INET6 && h->family == AF_INET6 &&
				   !bpf_probe_read_user(&sa, sizeof(sa), (void *)name)) {
				h->rport = __builtin_bswap16(sa.sin6_port);
				__builtin_memcpy(h->raddr, &sa.sin6_addr, 16);
			}
		}
	}
	if (!matched && !udp_port(h->lport) && !udp_port(h->rport))
		return;
	if (total > 0xffff)
		total = 0xffff;  // a UDP datagram's length field
	h->ts_enter = ts;
	h->ts_exit = bpf_ktime_get_ns();
	h->sock = (u64)sk;
	h->pid = id >> 32;
	h->tid = (u32)id;
	h->total = total;
	h->offset = 0;
	h->kind = K_DGRAM;
	h->egress = egress & 1;
	h->last = 1;
	h->pad = 0;
	h->stream_off = 0;
	h->recv_end = 0;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
	u64 n = total;
	if (n > avail)
		n = avail;
	if (n > CHUNK)
		n = CHUNK;
	count(C_UDP_DGRAMS, 1);
	if (n < total)
		count(C_UDP_TRUNC, 1);
	h->len = n;
	if (n == 0) {
		rb_output(r, sizeof(struct rec_hdr));
		return;
	}
	u64 sz = *(volatile u32 *)&h->len;
	asm volatile("%[n] += -1\n\t%[n] &= 0x3fff\n\t%[n] += 1" : [n] "+r"(sz));
	if (bpf_probe_read_user(r->data, sz, (void *)ubuf)) {
		count(C_READ_FAIL, 1);
		h->len = 0;
		rb_output(r, sizeof(struct rec_hdr));
		return;
	}
	rb_output(r, sizeof(struct rec_hdr) + sz);
}

struct mmsg_ctx {
	u64 id;
	struct active a;
	long ret;
};

// One message of a recvmmsg/sendmmsg (a bpf_loop step: the body is verified once).
static long mmsg_step(u32 i, void *arg)
{
	struct mmsg_ctx *c = arg;
	if (i >= c->ret || i >= MAX_MMSG)
		return 1;
	struct mmsghdr mh = {};
	if (bpf_probe_read_user(&mh, sizeof(mh), (void *)(c->a.buf + (u64)i * sizeof(struct mmsghdr))))
		return 1;
	struct iovec v = {};
	if (mh.msg_hdr.msg_iovlen == 0 || bpf_probe_read_user(&v, sizeof(v), (void *)mh.msg_hdr.msg_iov))
		return 0;
	emit_dgram(c->id, (struct sock *)c->a.sock, (u64)v.iov_base, v.iov_len, mh.msg_len, (u64)mh.msg_hdr.msg_name,
		   c->a.op & 1, c->a.ts, c->a.matched);
	return 0;
}

// Exit of a call on a UDP socket: its datagram(s) out as K_DGRAM records. mmsg is a constant
// per program (only the mmsg exits carry the loop).
static __always_inline int udp_exit(u64 id, struct active *a, long ret, bool mmsg)
{
	struct sock *sk = (struct sock *)a->sock;
	u8 egress = a->op & 1;
	if (a->op == WS_READ || a->op == WS_WRITE) {
		emit_dgram(id, sk, a->buf, ret, ret, a->name, egress, a->ts, a->matched);
		return 0;
	}
	if (a->op == WS_RECVMSG || a->op == WS_SENDMSG) {
		struct iovec v = {};
		if (a->cnt == 0 || bpf_probe_read_user(&v, sizeof(v), (void *)a->buf))
			return 0;
		emit_dgram(id, sk, (u64)v.iov_base, v.iov_len, ret, a->name, egress, a->ts, a->matched);
		return 0;
	}
	if (!mmsg || (a->op != WS_RECVMMSG && a->op != WS_SENDMMSG))
		return 0;
	// ret: how many messages were moved; each one's msg_len is its datagram's length
	struct mmsg_ctx c = { .id = id, .a = *a, .ret = ret };
	bpf_loop(MAX_MMSG, mmsg_step, &c, 0);
	return 0;
}

static __always_inline int on_exit_op(long ret, bool mmsg)
{
	u64 id = bpf_get_current_pid_tgid();
	struct active *ap = bpf_map_lookup_elem(&active, &id);
	if (!ap)
		return 0;
	struct active a = *ap;
	bpf_map_delete_elem(&active, &id);
	if (ret <= 0)
		return 0;
	if (a.udp)
		return udp_exit(id, &a, ret, mmsg);
	return emit_data(id, a.sock, a.buf, a.cnt, a.op >= WS_READV, a.ts, ret, a.op & 1 /* odd ops write */,
			 K_DATA, a.tls);
}

static __always_inline int on_exit(long ret)
{
	return on_exit_op(ret, false);
}

SEC("tracepoint/syscalls/sys_enter_read")
int enter_read(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->args[0], ctx->args[1], 0, WS_READ, 0);
}

SEC("tracepoint/syscalls/sys_enter_recvfrom")
int enter_recvfrom(struct trace_event_raw_sys_enter *ctx)
{
	// MSG_PEEK leaves the bytes queued: the read that consumes them reports them (nginx peeks
	// one byte of every connection on a listener with ssl to tell TLS from plain HTTP)
	if (ctx->args[3] & MSG_PEEK)
		return 0;
	return on_enter(ctx->args[0], ctx->args[1], 0, WS_READ, ctx->args[4]);  // src_addr: filled at exit
}

SEC("tracepoint/syscalls/sys_enter_write")
int enter_write(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->args[0], ctx->args[1], 0, WS_WRITE, 0);
}

SEC("tracepoint/syscalls/sys_enter_sendto")
int enter_sendto(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->args[0], ctx->args[1], 0, WS_WRITE, ctx->args[4]);  // dest_addr
}

SEC("tracepoint/syscalls/sys_enter_readv")
int enter_readv(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->args[0], ctx->args[1], ctx->args[2], WS_READV, 0);
}

SEC("tracepoint/syscalls/sys_enter_writev")
int enter_writev(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->args[0], ctx->args[1], ctx->args[2], WS_WRITEV, 0);
}

SEC("tracepoint/syscalls/sys_enter_recvmsg")
int enter_recvmsg(struct trace_event_raw_sys_enter *ctx)
{
	if (ctx->args[2] & MSG_PEEK)
		return 0;
	return on_enter_msg(ctx->args[0], ctx->args[1], WS_RECVMSG);
}

SEC("tracepoint/syscalls/sys_enter_sendmsg")
int enter_sendmsg(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter_msg(ctx->args[0], ctx->args[1], WS_SENDMSG);
}

// int sendmmsg(int fd, struct mmsghdr *msgvec, unsigned int vlen, int flags) and recvmmsg(..., flags,
// struct timespec *timeout): UDP only (on_enter).
SEC("tracepoint/syscalls/sys_enter_recvmmsg")
int enter_recvmmsg(struct trace_event_raw_sys_enter *ctx)
{
	if (ctx->args[3] & MSG_PEEK)
		return 0;
	return on_enter(ctx->args[0], ctx->args[1], ctx->args[2], WS_RECVMMSG, 0);
}

SEC("tracepoint/syscalls/sys_enter_sendmmsg")
int enter_sendmmsg(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(ctx->args[0], ctx->args[1], ctx->args[2], WS_SENDMMSG, 0);
}

SEC("tracepoint/syscalls/sys_exit_recvmmsg")
int exit_recvmmsg(struct trace_event_raw_sys_exit *ctx) { return on_exit_op(ctx->ret, true); }
SEC("tracepoint/syscalls/sys_exit_sendmmsg")
int exit_sendmmsg(struct trace_event_raw_sys_exit *ctx) { return on_exit_op(ctx->ret, true); }

SEC("tracepoint/syscalls/sys_exit_read")
int exit_read(struct trace_event_raw_sys_exit *ctx) { return on_exit(ctx->ret); }
SEC("tracepoint/syscalls/sys_exit_recvfrom")
int exit_recvfrom(struct trace_event_raw_sys_exit *ctx) { return on_exit(ctx->ret); }
SEC("tracepoint/syscalls/sys_exit_write")
int exit_write(struct trace_event_raw_sys_exit *ctx) { return on_exit(ctx->ret); }
SEC("tracepoint/syscalls/sys_exit_sendto")
int exit_sendto(struct trace_event_raw_sys_exit *ctx) { return on_exit(ctx->ret); }
SEC("tracepoint/syscalls/sys_exit_readv")
int exit_readv(struct trace_event_raw_sys_exit *ctx) { return on_exit(ctx->ret); }
SEC("tracepoint/syscalls/sys_exit_writev")
int exit_writev(struct trace_event_raw_sys_exit *ctx) { return on_exit(ctx->ret); }
SEC("tracepoint/syscalls/sys_exit_recvmsg")
int exit_recvmsg(struct trace_event_raw_sys_exit *ctx) { return on_exit(ctx->ret); }
SEC("tracepoint/syscalls/sys_exit_sendmsg")
int exit_sendmsg(struct trace_event_raw_sys_exit *ctx) { return on_exit(ctx->ret); }

SEC("tracepoint/syscalls/sys_enter_close")
int enter_close(struct trace_event_raw_sys_enter *ctx)
{
	struct ws_cfg *cfg = get_config();
	if (!cfg)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	if (!want_process(cfg, id >> 32))
		return 0;
	struct sock *sk = fd_to_tcp_sock(ctx->args[0]);
	if (!sk)
		return 0;
	u32 zero = 0;
	struct record *r = bpf_map_lookup_elem(&scratch, &zero);
	if (!r)
		return 0;
	struct rec_hdr *h = &r->h;
	struct seen_key sk_key = { .sock = (u64)sk, .pid = id >> 32 };
	struct seen_val *sv = bpf_map_lookup_elem(&seen, &sk_key);
	if (!sv)
		return 0;  // never reported data for it: nothing to close
	u64 sent = sv->bytes[1], received = sv->bytes[0];
	u64 tls_sent = sv->tls_bytes[1], tls_received = sv->tls_bytes[0];
	bpf_map_delete_elem(&seen, &sk_key);
	fill_tuple(h, sk);
	h->ts_enter = h->ts_exit = bpf_ktime_get_ns();
	h->sock = (u64)sk;
	h->pid = id >> 32;
	h->tid = (u32)id;
	h->total = 0;
	h->offset = 0;
	h->len = 0;
	h->egress = 0;
	h->last = 1;
	h->pad = 0;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
	if (tls_sent | tls_received) {
		// first: where the plaintext streams ended (their lost tail records become gaps)
		h->kind = K_TLS_CLOSE;
		h->stream_off = tls_sent;
		h->recv_end = tls_received;
		rb_output(h, sizeof(*h));
	}
	h->kind = K_CLOSE;
	h->stream_off = sent;
	h->recv_end = received;
	rb_output(h, sizeof(*h));
	return 0;
}

// ---------------------------------------------------------------- OpenSSL uprobes
// int SSL_write(SSL *s, const void *buf, int num), int SSL_read(SSL *s, void *buf, int num):
// ret is the byte count. int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)
// and SSL_read_ex(..., size_t *readbytes): ret is 1 on success, the count is in *written.
// Same signatures in OpenSSL 1.1.1 and 3.x. Neither variant calls the other through the
// PLT, so each call fires one pair of probes.
static __always_inline int ssl_enter(u64 ssl, u64 buf, u64 len_ptr, u8 egress, u8 ex)
{
	struct ws_cfg *cfg = get_config();
	if (!cfg)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	if (!want_process(cfg, id >> 32))
		return 0;
	struct ssl_call c = {
		.ssl = ssl, .buf = buf, .len_ptr = len_ptr, .ts = bpf_ktime_get_ns(), .egress = egress, .ex = ex,
	};
	struct ssl_key k = { .ssl = ssl, .pid = id >> 32 };
	u64 *skp = bpf_map_lookup_elem(&ssl_socks, &k);
	if (skp)
		c.sock = *skp;
	bpf_map_update_elem(&ssl_calls, &id, &c, BPF_ANY);
	return 0;
}

static __always_inline int ssl_exit(long ret)
{
	u64 id = bpf_get_current_pid_tgid();
	struct ssl_call *cp = bpf_map_lookup_elem(&ssl_calls, &id);
	if (!cp)
		return 0;
	struct ssl_call c = *cp;
	bpf_map_delete_elem(&ssl_calls, &id);
	if (c.ex) {
		if (ret != 1)
			return 0;
		u64 n = 0;
		if (bpf_probe_read_user(&n, sizeof(n), (void *)c.len_ptr))
			return 0;
		ret = n > 0x7fffffff ? 0x7fffffff : (long)n;
	}
	if (!c.io) {
		// no socket I/O inside: a memory BIO (or OpenSSL's buffer). What the call left to send
		// (an SSL_read drives the handshake too) goes out with the thread's next TCP write outside
		// an SSL call, which (re)binds the SSL* to that socket
		struct ssl_pending pend = { .ssl = c.ssl, .ts = bpf_ktime_get_ns() };
		bpf_map_update_elem(&ssl_pending, &id, &pend, BPF_ANY);
	}
	if (ret <= 0)
		return 0;
	if (!c.sock) {
		count(C_TLS_NO_SOCK_CALLS, 1);
		count(C_TLS_NO_SOCK_BYTES, ret);
		return 0;
	}
	struct ws_cfg *cfg = get_config();
	if (!cfg)
		return 0;
	if (cfg->filter_ports) {
		struct sock *sk = (struct sock *)c.sock;
		u16 lport = BPF_CORE_READ(sk, __sk_common.skc_num);
		u16 rport = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
		if (!bpf_map_lookup_elem(&port_filter, &lport) && !bpf_map_lookup_elem(&port_filter, &rport)) {
			struct seen_key sk_key = { .sock = c.sock, .pid = id >> 32 };
			if (!bpf_map_lookup_elem(&seen, &sk_key))
				return 0;
		}
	}
	return emit_data(id, c.sock, c.buf, 0, 0, c.ts, ret, c.egress, K_TLS_DATA, 0);
}

SEC("uprobe")
int BPF_KPROBE(up_ssl_write, void *ssl, const void *buf, int num)
{
	return ssl_enter((u64)ssl, (u64)buf, 0, 1, 0);
}

SEC("uprobe")
int BPF_KPROBE(up_ssl_read, void *ssl, void *buf, int num)
{
	return ssl_enter((u64)ssl, (u64)buf, 0, 0, 0);
}

SEC("uprobe")
int BPF_KPROBE(up_ssl_write_ex, void *ssl, const void *buf, u64 num, u64 *written)
{
	return ssl_enter((u64)ssl, (u64)buf, (u64)written, 1, 1);
}

SEC("uprobe")
int BPF_KPROBE(up_ssl_read_ex, void *ssl, void *buf, u64 num, u64 *readbytes)
{
	return ssl_enter((u64)ssl, (u64)buf, (u64)readbytes, 0, 1);
}

SEC("uretprobe")
int BPF_KRETPROBE(uret_ssl_call, int ret)
{
	// one return program for all four: the entry probe said which variant it was. All four
	// return an int: only the low 32 bits of the return register are defined.
	return ssl_exit((long)ret);
}

// int SSL_do_handshake(SSL *s), SSL_connect, SSL_accept: a socket BIO's syscalls inside bind the
// SSL* to its socket; with a memory BIO, the output left is written next (ssl_pending).
// SSL_connect/SSL_accept call SSL_do_handshake: the inner return does the work.
SEC("uprobe")
int BPF_KPROBE(up_ssl_handshake, void *ssl)
{
	struct ws_cfg *cfg = get_config();
	if (!cfg)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	if (!want_process(cfg, id >> 32))
		return 0;
	u64 v = (u64)ssl;
	bpf_map_update_elem(&ssl_hs, &id, &v, BPF_ANY);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(uret_ssl_handshake, int ret)
{
	u64 id = bpf_get_current_pid_tgid();
	u64 *sp = bpf_map_lookup_elem(&ssl_hs, &id);
	if (!sp)
		return 0;
	u64 ssl = *sp;
	bpf_map_delete_elem(&ssl_hs, &id);
	struct ssl_key k = { .ssl = ssl, .pid = id >> 32 };
	if (bpf_map_lookup_elem(&ssl_socks, &k))
		return 0;
	struct ssl_pending pend = { .ssl = ssl, .ts = bpf_ktime_get_ns() };
	bpf_map_update_elem(&ssl_pending, &id, &pend, BPF_ANY);
	return 0;
}

// int SSL_set_fd(SSL *s, int fd): binds the SSL* to the fd's socket before any I/O.
SEC("uprobe")
int BPF_KPROBE(up_ssl_set_fd, void *ssl, int fd)
{
	struct ws_cfg *cfg = get_config();
	if (!cfg)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	if (!want_process(cfg, id >> 32) || fd < 0)
		return 0;
	struct sock *sk = fd_to_tcp_sock((u64)fd);
	if (!sk)
		return 0;
	struct ssl_key k = { .ssl = (u64)ssl, .pid = id >> 32 };
	u64 skv = (u64)sk;
	bpf_map_update_elem(&ssl_socks, &k, &skv, BPF_ANY);
	return 0;
}

// A process image was replaced: userspace looks at its mappings for a TLS library.
SEC("tracepoint/sched/sched_process_exec")
int on_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	struct ws_cfg *cfg = get_config();
	if (!cfg || !cfg->tls)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	if (!want_process(cfg, id >> 32))
		return 0;
	u32 zero = 0;
	struct record *r = bpf_map_lookup_elem(&scratch, &zero);
	if (!r)
		return 0;
	struct rec_hdr *h = &r->h;
	__builtin_memset(h, 0, sizeof(*h));
	h->ts_enter = h->ts_exit = bpf_ktime_get_ns();
	h->pid = id >> 32;
	h->tid = (u32)id;
	h->kind = K_EXEC;
	h->last = 1;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
	rb_output(h, sizeof(*h));
	return 0;
}
