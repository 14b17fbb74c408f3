#!/bin/sh
# /init of the kernel-matrix VM (xtask/src/vm.rs), run by busybox: mount what h2trace and its
# kernel tests use, load the netfilter modules, check that `h2trace check` sees kprobes and
# fentry, run the kernel tests once per probe mode, print one result line, power off.
# /etc/h2trace-vm.conf (written by xtask) sets H2TRACE, TESTS, PROBE_TESTS, PROBES and MODULES.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1
# Emulated CPUs run the same work several times slower: the tests stretch the waits and bounds
# that are about the host's speed (tests/common, `scaled`), never what they assert about TCP.
export H2TRACE_TEST_SLOWDOWN=5
. /etc/h2trace-vm.conf

# The root is already a writable tmpfs: nothing is mounted over /tmp or /run, which may hold the
# programs (the repository's path on the host). busybox finds itself through /proc; its applets
# do not replace the host's tools in the image.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup

uptime_s() { cut -d' ' -f1 /proc/uptime; }
echo "H2TRACE-VM: init at $(uptime_s) s, kernel $(uname -r)"
failed=""

# Netfilter and veth are modules in Debian's kernels. Load the ones every test needs; the rest
# (nft expressions) the kernel loads on demand through /sbin/modprobe.
modprobe -a $MODULES || failed="$failed modprobe"
ip link set lo up

# The probes this matrix exists for must be there: kprobes and fentry on tcp_set_state.
"$H2TRACE" check >/tmp/check.txt 2>&1
cat /tmp/check.txt
for hook in "kprobe tcp_set_state" "fentry tcp_set_state"; do
	grep -q "^ *ok  *$hook" /tmp/check.txt || failed="$failed check:$hook"
done

# Tracepoint layouts differ between kernels; the log keeps the ones h2trace reads.
for e in sock/inet_sock_set_state tcp/tcp_send_reset tcp/tcp_receive_reset tcp/tcp_retransmit_skb \
	tcp/tcp_destroy_sock sock/sock_send_length sock/sock_recv_length; do
	echo "H2TRACE-VM: format of $e:"
	grep -h 'field:' "/sys/kernel/tracing/events/$e/format" 2>&1
done

# Every kernel test with the default state hook, then the state-hook tests with each of PROBES.
run_tests() { # PROBE TESTS...
	probe=$1
	shift
	for t in "$@"; do
		start=$(uptime_s)
		echo "H2TRACE-VM: running $t with --probe $probe"
		if [ "$probe" = auto ]; then
			"$t" --test-threads=1 || failed="$failed $(basename "$t"):$probe"
		else
			H2TRACE_TEST_PROBE=$probe "$t" --test-threads=1 || failed="$failed $(basename "$t"):$probe"
		fi
		echo "H2TRACE-VM: $(basename "$t") --probe $probe took $start..$(uptime_s) s"
	done
}
run_tests auto $TESTS
for probe in $PROBES; do
	run_tests "$probe" $PROBE_TESTS
done

echo "H2TRACE-VM: tests ended at $(uptime_s) s"
if [ -z "$failed" ]; then
	echo "H2TRACE-VM-RESULT: PASS"
else
	echo "H2TRACE-VM-RESULT: FAIL ($failed )"
fi
sync
poweroff -f
echo o >/proc/sysrq-trigger
