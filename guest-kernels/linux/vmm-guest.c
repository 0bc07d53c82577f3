/*
 * vmm-guest: the userspace of the test kernel's initramfs (build-test-kernel.sh compiles it with
 * `gcc -static`; the initramfs has no libc). /init (test-init) hands over to `vmm-guest init`.
 * Every line it prints starts with "vmm-init:", as the stock kernel's init (./init) does, so
 * tests read both the same way.
 *
 * Why C and not the shell: on nested PVM hosts guest ring 0 is emulated, and measured there a
 * system call costs about 0.3 ms, a first-touch page fault about 2 ms and a fork about 0.2 s
 * (`vmm-guest bench`). A busybox loop that reads /proc/vmstat with `read` makes thousands of
 * one-byte system calls a round; this program makes a handful.
 *
 *   vmm-guest init
 *       PID 1: mounts /proc, /sys, /dev (devtmpfs) and /tmp, then prints
 *         vmm-init: kernel RELEASE, N CPUs
 *         vmm-init: balloon virtioN driver virtio_balloon features BITS (NAMES)
 *         vmm-init: ready
 *       and once a second
 *         vmm-init: round N MemTotal:KB MemFree:KB MemAvailable:KB balloon_inflate:PAGES balloon_deflate:PAGES virtio_irqs:N
 *       (virtio_irqs: interrupts from virtio devices in /proc/interrupts, summed over CPUs)
 *       It follows the host and never drives the balloon: the host sets the target
 *       (PATCH /balloon), Linux's virtio_balloon inflates or deflates, the counters show it.
 *       Knobs on the kernel command line:
 *         vmm.rounds=N     stop after N rounds (default 0: run until the VM is killed)
 *         vmm.churn=MiB    write and remove MiB of tmpfs page cache each round (default 0)
 *         vmm.hold=MiB     keep MiB of anonymous memory written with a pattern and verify all
 *                          of it every second (as `hold`) while the host moves the balloon;
 *                          lines "vmm-init: mem hold ...", its verdict after the last round
 *         vmm.pressure=MiB[@R]  run `pressure MiB` once, in a child while the rounds go on:
 *                          at round R, or without @R at the first round in which the balloon
 *                          holds pages and has not changed since the round before
 *                          (deflate-on-oom: allocate more than is free); when it ends, a line
 *                          "vmm-init: after pressure MemTotal:..." like a round's
 *         vmm.bench=1      print `bench`'s line before "ready"
 *         vmm.end=poweroff|halt  after the last round (default poweroff: `vmm run` exits 0)
 *   vmm-guest pressure MIB [ROUNDS]
 *       Allocates MIB MiB of anonymous memory, writes a pattern to every 4 KiB page (each 8-byte
 *       word holds its own address and a seed), reads it all back, frees it; ROUNDS times
 *       (default 1). Allocating more than is free makes Linux reclaim, and with the balloon's
 *       DEFLATE_ON_OOM its OOM notifier deflates the balloon. Exit status 0 when every word read
 *       back as written, 1 when any did not, 2 on a usage or allocation error.
 *   vmm-guest hold MIB SECONDS
 *       Writes the pattern to MIB MiB once, then verifies all of it every second for SECONDS
 *       seconds (0: until SIGTERM). A page the guest owns that the host took away or gave back
 *       zeroed shows up as bad pages.
 *   vmm-guest bench
 *       Times a system call, a first-touch page fault and a fork + exit + wait.
 *   vmm-guest poweroff
 *       Powers the VM off through the VMM's sleep control register (port 0x600, SLP_TYP 5 with
 *       SLP_EN): the test kernel has no ACPI, so Linux's own power-off only halts.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MIB (1024UL * 1024UL)
#define SLEEP_CONTROL_PORT 0x600
#define SLP_TYP_S5 5
#define SLP_EN (1 << 5)

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- the pattern ---- */

static uint64_t word(const uint64_t *p, uint64_t seed)
{
	uint64_t x = (uint64_t)(uintptr_t)p ^ (seed * 0x9e3779b97f4a7c15ULL);
	return x ^ (x >> 29);
}

static void fill(uint64_t *buf, size_t bytes, uint64_t seed)
{
	for (size_t i = 0; i < bytes / 8; i++)
		buf[i] = word(&buf[i], seed);
}

/* The number of 4 KiB pages with at least one wrong word; the first few are named. */
static size_t verify(uint64_t *buf, size_t bytes, uint64_t seed, const char *what)
{
	size_t bad_pages = 0, words = PAGE / 8;
	for (size_t p = 0; p < bytes / PAGE; p++) {
		uint64_t *page = buf + p * words;
		for (size_t i = 0; i < words; i++) {
			if (page[i] != word(&page[i], seed)) {
				if (bad_pages < 8)
					printf("vmm-init: mem %s: page %zu (offset %#zx) word %zu is %#llx, wrote %#llx\n",
					       what, p, p * PAGE, i, (unsigned long long)page[i],
					       (unsigned long long)word(&page[i], seed));
				bad_pages++;
				break;
			}
		}
	}
	return bad_pages;
}

static uint64_t *map(size_t bytes)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		printf("vmm-init: mem mmap of %zu MiB failed: %s\n", bytes / MIB, strerror(errno));
		return NULL;
	}
	return p;
}

/* ---- the subcommands ---- */

static int pressure(unsigned long mib, unsigned long rounds)
{
	size_t bytes = mib * MIB, total_bad = 0;
	for (unsigned long r = 1; r <= rounds; r++) {
		double t0 = now();
		uint64_t *buf = map(bytes);
		if (!buf)
			return 2;
		fill(buf, bytes, r);
		double t1 = now();
		size_t bad = verify(buf, bytes, r, "pressure");
		double t2 = now();
		munmap(buf, bytes);
		total_bad += bad;
		printf("vmm-init: mem pressure round %lu/%lu: %lu MiB written in %.2fs, verified in %.2fs, bad pages %zu\n",
		       r, rounds, mib, t1 - t0, t2 - t1, bad);
	}
	printf("vmm-init: mem pressure %s: %lu MiB x %lu rounds, bad pages %zu\n",
	       total_bad ? "FAIL" : "PASS", mib, rounds, total_bad);
	return total_bad ? 1 : 0;
}

static volatile sig_atomic_t stop;
static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static int hold(unsigned long mib, unsigned long seconds)
{
	size_t bytes = mib * MIB, total_bad = 0;
	const uint64_t seed = 0x5eed;
	struct sigaction sa = { .sa_handler = on_signal };
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	uint64_t *buf = map(bytes);
	if (!buf)
		return 2;
	double t0 = now();
	fill(buf, bytes, seed);
	printf("vmm-init: mem hold %lu MiB written in %.2fs\n", mib, now() - t0);
	double start = now();
	unsigned long pass = 0;
	while (!stop && (seconds == 0 || now() - start < seconds)) {
		sleep(1); /* returns early on SIGTERM */
		size_t bad = verify(buf, bytes, seed, "hold");
		total_bad += bad;
		pass++;
		printf("vmm-init: mem hold pass %lu: %lu MiB verified, bad pages %zu\n", pass, mib, bad);
	}
	printf("vmm-init: mem hold %s: %lu MiB, %lu passes, bad pages %zu\n",
	       total_bad ? "FAIL" : "PASS", mib, pass, total_bad);
	munmap(buf, bytes);
	return total_bad ? 1 : 0;
}

static int bench(void)
{
	double t0 = now();
	for (int i = 0; i < 200; i++)
		getppid();
	double t1 = now();
	const size_t pages = 256;
	volatile char *p = (volatile char *)map(pages * PAGE);
	if (!p)
		return 2;
	for (size_t i = 0; i < pages; i++)
		p[i * PAGE] = 1;
	double t2 = now();
	munmap((void *)p, pages * PAGE);
	for (int i = 0; i < 5; i++) {
		pid_t pid = fork();
		if (pid == 0)
			_exit(0);
		waitpid(pid, NULL, 0);
	}
	double t3 = now();
	printf("vmm-init: bench: system call %.0f us, first-touch page fault %.0f us, fork+exit+wait %.1f ms\n",
	       (t1 - t0) / 200 * 1e6, (t2 - t1) / pages * 1e6, (t3 - t2) / 5 * 1e3);
	return 0;
}

static int poweroff(void)
{
	sync();
	if (ioperm(SLEEP_CONTROL_PORT, 1, 1) != 0) {
		printf("vmm-init: poweroff: ioperm(%#x) failed: %s\n", SLEEP_CONTROL_PORT,
		       strerror(errno));
		return 2;
	}
	outb((SLP_TYP_S5 << 2) | SLP_EN, SLEEP_CONTROL_PORT);
	/* Not reached under the VMM. */
	printf("vmm-init: poweroff: still running after the S5 write\n");
	return 2;
}

/* ---- init ---- */

/* Reads a small file whole (one read for /proc files up to the buffer's size). */
static ssize_t slurp(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t n = 0;
	ssize_t r;
	while (n + 1 < size && (r = read(fd, buf + n, size - 1 - n)) > 0)
		n += r;
	close(fd);
	buf[n] = 0;
	return n;
}

static char cmdline[4096];

/* The value of KEY=value on the kernel command line, or dflt. */
static const char *arg(const char *key, const char *dflt)
{
	static char value[256];
	size_t klen = strlen(key);
	for (char *w = cmdline; *w;) {
		while (*w == ' ' || *w == '\n')
			w++;
		size_t len = strcspn(w, " \n");
		if (len > klen && !strncmp(w, key, klen) && w[klen] == '=') {
			size_t vlen = len - klen - 1 < sizeof(value) - 1 ? len - klen - 1 : sizeof(value) - 1;
			memcpy(value, w + klen + 1, vlen);
			value[vlen] = 0;
			return value;
		}
		w += len;
	}
	return dflt;
}

static unsigned long number(const char *s)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 0);
	if (errno || *end || end == s) {
		printf("vmm-init: not a number: %s\n", s);
		exit(2);
	}
	return v;
}

/* The value of "key value" or "key: value kB" lines. */
static long field(const char *text, const char *key)
{
	size_t klen = strlen(key);
	for (const char *l = text; l && *l; l = strchr(l, '\n'), l = l ? l + 1 : NULL)
		if (!strncmp(l, key, klen) && (l[klen] == ' ' || l[klen] == ':'))
			return strtol(l + klen + 1, NULL, 10);
	return -1;
}

static const char *feature_names(const char *bits)
{
	static const struct { int bit; const char *name; } names[] = {
		{ 0, "MUST_TELL_HOST" }, { 1, "STATS_VQ" }, { 2, "DEFLATE_ON_OOM" },
		{ 3, "FREE_PAGE_HINT" }, { 4, "PAGE_POISON" }, { 5, "REPORTING" },
		{ 28, "INDIRECT_DESC" }, { 29, "EVENT_IDX" }, { 32, "VERSION_1" },
		{ 33, "ACCESS_PLATFORM" },
	};
	static char out[256];
	out[0] = 0;
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		if ((size_t)names[i].bit < strlen(bits) && bits[names[i].bit] == '1') {
			if (out[0])
				strcat(out, " ");
			strcat(out, names[i].name);
		}
	}
	return out;
}

/* The balloon is virtio device type 5; its driver is built in, so it is bound by now. */
static void say_balloon(void)
{
	char path[512], buf[256], link[256];
	for (int tries = 0; tries < 100; tries++) {
		DIR *d = opendir("/sys/bus/virtio/devices");
		struct dirent *e;
		while (d && (e = readdir(d))) {
			if (e->d_name[0] == '.')
				continue;
			snprintf(path, sizeof(path), "/sys/bus/virtio/devices/%s/device", e->d_name);
			if (slurp(path, buf, sizeof(buf)) < 0 || strncmp(buf, "0x0005", 6))
				continue;
			snprintf(path, sizeof(path), "/sys/bus/virtio/devices/%s/driver", e->d_name);
			ssize_t n = readlink(path, link, sizeof(link) - 1);
			if (n < 0)
				continue;
			link[n] = 0;
			snprintf(path, sizeof(path), "/sys/bus/virtio/devices/%s/features", e->d_name);
			if (slurp(path, buf, sizeof(buf)) < 0)
				continue;
			buf[strcspn(buf, "\n")] = 0;
			const char *driver = strrchr(link, '/') ? strrchr(link, '/') + 1 : link;
			printf("vmm-init: balloon %s driver %s features %s (%s)\n", e->d_name, driver, buf,
			       feature_names(buf));
			closedir(d);
			return;
		}
		if (d)
			closedir(d);
		usleep(100000);
	}
	printf("vmm-init: no virtio-balloon device bound\n");
}

static char meminfo[8192], vmstat[16384], interrupts[16384];

/* Interrupts Linux took from virtio devices, summed over CPUs (/proc/interrupts lines naming a
 * virtio device): the balloon's used-ring and configuration-change interrupts arrived. */
static long virtio_interrupts(void)
{
	if (slurp("/proc/interrupts", interrupts, sizeof(interrupts)) < 0)
		return -1;
	long total = 0;
	for (char *l = interrupts; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
		char *end = strchr(l, '\n');
		char *hit = strstr(l, "virtio");
		if (!hit || (end && hit > end))
			continue;
		char *p = strchr(l, ':');
		if (!p)
			continue;
		for (p++;;) {
			char *next;
			long v = strtol(p, &next, 10);
			if (next == p)
				break;
			total += v;
			p = next;
		}
	}
	return total;
}

/* One round's line; returns the balloon's size in pages (inflated - deflated). */
static long report(const char *label)
{
	slurp("/proc/meminfo", meminfo, sizeof(meminfo));
	slurp("/proc/vmstat", vmstat, sizeof(vmstat));
	long inflated = field(vmstat, "balloon_inflate"), deflated = field(vmstat, "balloon_deflate");
	printf("vmm-init: %s MemTotal:%ld MemFree:%ld MemAvailable:%ld balloon_inflate:%ld balloon_deflate:%ld virtio_irqs:%ld\n",
	       label, field(meminfo, "MemTotal"), field(meminfo, "MemFree"),
	       field(meminfo, "MemAvailable"), inflated, deflated, virtio_interrupts());
	return inflated - deflated;
}

static void churn(unsigned long mib)
{
	static char block[MIB];
	int fd = open("/tmp/churn", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return;
	for (unsigned long i = 0; i < mib; i++)
		if (write(fd, block, sizeof(block)) < 0)
			break;
	close(fd);
	unlink("/tmp/churn");
}

static int init(void)
{
	mkdir("/proc", 0755);
	mkdir("/sys", 0755);
	mkdir("/dev", 0755);
	mkdir("/tmp", 01777);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("tmpfs", "/tmp", "tmpfs", 0, NULL);
	int fd = open("/dev/console", O_RDWR);
	if (fd >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	slurp("/proc/cmdline", cmdline, sizeof(cmdline));

	struct utsname u;
	uname(&u);
	printf("vmm-init: kernel %s, %ld CPUs\n", u.release, sysconf(_SC_NPROCESSORS_ONLN));
	say_balloon();

	unsigned long rounds = number(arg("vmm.rounds", "0"));
	unsigned long churn_mib = number(arg("vmm.churn", "0"));
	unsigned long hold_mib = number(arg("vmm.hold", "0"));
	char pressure_arg[64];
	snprintf(pressure_arg, sizeof(pressure_arg), "%s", arg("vmm.pressure", "0"));
	long pressure_at = -1;
	char *at = strchr(pressure_arg, '@');
	if (at) {
		*at = 0;
		pressure_at = number(at + 1);
	}
	unsigned long pressure_mib = number(pressure_arg);
	int halt = !strcmp(arg("vmm.end", "poweroff"), "halt");
	if (strcmp(arg("vmm.bench", "0"), "0"))
		bench();

	pid_t holder = 0, presser = 0;
	if (hold_mib) {
		holder = fork();
		if (holder == 0)
			_exit(hold(hold_mib, 0));
	}
	printf("vmm-init: ready\n");

	long last = 0;
	double next = now();
	for (unsigned long i = 1; rounds == 0 || i <= rounds; i++) {
		if (churn_mib)
			churn(churn_mib);
		char label[32];
		snprintf(label, sizeof(label), "round %lu", i);
		long pages = report(label);
		if (pressure_mib && ((pressure_at >= 0 && (long)i >= pressure_at) ||
				     (pressure_at < 0 && pages > 0 && pages == last))) {
			printf("vmm-init: pressure %lu MiB with the balloon at %ld pages\n", pressure_mib, pages);
			presser = fork();
			if (presser == 0)
				_exit(pressure(pressure_mib, 1));
			pressure_mib = 0;
		}
		last = pages;
		/* Once a second; a late round does not make the next ones come faster. */
		next += 1;
		double wait = next - now();
		if (wait < 0) {
			next = now();
			wait = 0;
		}
		struct timespec ts = { (time_t)wait, (long)((wait - (time_t)wait) * 1e9) };
		nanosleep(&ts, NULL);
		pid_t p;
		while ((p = waitpid(-1, NULL, WNOHANG)) > 0) { /* PID 1 reaps orphans too */
			if (p == presser) {
				presser = 0;
				report("after pressure");
			}
			if (p == holder)
				holder = 0;
		}
	}
	if (presser > 0) {
		waitpid(presser, NULL, 0);
		report("after pressure");
	}
	if (holder > 0) {
		kill(holder, SIGTERM);
		waitpid(holder, NULL, 0);
	}
	printf("vmm-init: done\n");
	if (!halt)
		poweroff();
	for (;;)
		pause();
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 2 && !strcmp(argv[1], "init"))
		return init();
	if (argc >= 3 && !strcmp(argv[1], "pressure"))
		return pressure(number(argv[2]), argc > 3 ? number(argv[3]) : 1);
	if (argc == 4 && !strcmp(argv[1], "hold"))
		return hold(number(argv[2]), number(argv[3]));
	if (argc == 2 && !strcmp(argv[1], "bench"))
		return bench();
	if (argc == 2 && !strcmp(argv[1], "poweroff"))
		return poweroff();
	fprintf(stderr, "usage: vmm-guest init | pressure MIB [ROUNDS] | hold MIB SECONDS | bench | poweroff\n");
	return 2;
}
