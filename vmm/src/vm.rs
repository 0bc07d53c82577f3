//! A VM: KVM VM fd, memfd-backed RAM in memslots, the in-kernel irqchip, the loaded guest and
//! its vCPUs; `run` drives it to the guest's verdict from an event-manager loop.

use crate::acpi;
use crate::boot::{cpu, linux, mptable, test_guest, BootPlan};
use crate::config::{format_size, BootSource, VmConfig};
use crate::devices::balloon::steps::BalloonSteps;
use crate::devices::balloon::{BalloonDevice, BalloonHandler};
use crate::devices::balloon::{BALLOON_GSI, BALLOON_MMIO_BASE};
use crate::devices::serial::{COM1_BASE, COM1_GSI};
use crate::devices::virtio::MMIO_SIZE;
use crate::devices::{PortIo, SerialPort};
use crate::error::VmmError;
use crate::kvm::{self, err};
use crate::memory::MemoryManager;
use crate::signals;
use crate::vcpu::{self, VmShared};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use guest_mm::GuestRam;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub use crate::vcpu::Outcome;

/// The most vCPUs the project's test guests support (guest-kernels/rt MAX_CPUS).
pub const GUEST_MAX_VCPUS: u32 = 64;
/// Event loop tick: bounds how late a balloon step or a statistics request is noticed (the
/// gather's worker times its own batch windows).
const TICK_MS: i32 = 5;
/// How often the guest is asked for fresh balloon statistics.
/// Address of the TSS KVM needs on Intel hosts (three pages, inside the MMIO hole).
const KVM_TSS_ADDR: usize = 0xfffb_d000;

pub struct Vm {
    _kvm: Kvm,
    vm_fd: VmFd,
    ram: Arc<GuestRam>,
    memory: Arc<MemoryManager>,
    balloon: Arc<BalloonDevice>,
    steps: BalloonSteps,
    api_sock: Option<std::path::PathBuf>,
    reclaim_probe: bool,
    vcpus: Vec<VcpuFd>,
    serial_irq: EventFd,
    boot: BootSummary,
}

/// What was booted, for the VMM's start-up lines.
#[derive(Clone, Debug)]
pub struct BootSummary {
    /// e.g. "test guest memtouch" or "Linux (bzImage, 64-bit boot protocol)".
    pub what: String,
    /// The command line as the guest receives it.
    pub cmdline: String,
    /// Where the RSDP is, if the VMM wrote ACPI tables.
    pub rsdp: Option<u64>,
    /// The initrd's place in guest memory.
    pub initrd: Option<(u64, u64)>,
}

/// The machine the ACPI tables describe: the devices this VMM always has.
pub fn acpi_platform(vcpus: u32) -> acpi::Platform {
    acpi::Platform {
        vcpus,
        serial: (COM1_BASE, COM1_GSI),
        virtio_mmio: vec![acpi::VirtioMmio {
            base: BALLOON_MMIO_BASE,
            size: MMIO_SIZE,
            gsi: BALLOON_GSI,
        }],
        power: crate::devices::power::PORTS,
    }
}

pub struct RunReport {
    pub outcome: Outcome,
    pub elapsed: Duration,
    pub balloon: crate::report::BalloonReport,
}

impl Vm {
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        let kvm = kvm::open(&config.kvm_device)?;
        if config.vcpus == 0 {
            return Err(VmmError::NoVcpus);
        }
        let max = kvm::max_vcpus(&kvm);
        if config.vcpus as usize > max {
            return Err(VmmError::TooManyVcpus {
                requested: config.vcpus,
                max,
            });
        }
        match &config.boot {
            BootSource::TestGuest(_) if config.vcpus > GUEST_MAX_VCPUS => {
                return Err(VmmError::TooManyGuestVcpus {
                    requested: config.vcpus,
                    max: GUEST_MAX_VCPUS,
                })
            }
            BootSource::Linux(_) if config.vcpus > acpi::MAX_VCPUS => {
                return Err(VmmError::TooManyLinuxVcpus {
                    requested: config.vcpus,
                    max: acpi::MAX_VCPUS,
                })
            }
            _ => {}
        }
        guest_mm::Layout::new(config.memory)?;
        config
            .reclaim
            .validate(config.backing.granule())
            .map_err(crate::memory::MemoryError::from)?;

        let vm_fd = kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
        let ram = Arc::new(GuestRam::with_backing(
            config.memory,
            &config.backing,
            config.keep_host_fault_around,
        )?);
        for (slot, r) in ram.layout().ranges().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: ram.host_addr(r) as u64,
            };
            // SAFETY: the region is a live mapping of `r.size` bytes owned by `ram`, which the
            // Vm keeps alive for as long as the VM fd.
            unsafe { vm_fd.set_user_memory_region(region) }
                .map_err(err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        vm_fd
            .set_tss_address(KVM_TSS_ADDR)
            .map_err(err("KVM_SET_TSS_ADDR"))?;
        vm_fd.create_irq_chip().map_err(err("KVM_CREATE_IRQCHIP"))?;
        if matches!(config.boot, BootSource::Linux(_)) {
            // Linux calibrates against the PIT when it has no better clock.
            let pit = kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm_fd.create_pit2(pit).map_err(err("KVM_CREATE_PIT2"))?;
        }
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Device(e.to_string()))?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_GSI)
            .map_err(err("KVM_IRQFD"))?;

        let memory = Arc::new(MemoryManager::for_vm(ram.clone(), &vm_fd, config.reclaim)?);
        let balloon = BalloonDevice::attach(&vm_fd, memory.clone(), config.balloon_features)
            .map_err(VmmError::Device)?;
        let steps = BalloonSteps::new(config.balloon_steps.clone(), config.balloon_step_timeout);
        balloon.steps_pending.store(
            !config.balloon_steps.is_empty(),
            std::sync::atomic::Ordering::Release,
        );

        let cmdline = format!("{} {}", config.cmdline, BalloonDevice::cmdline_entry());
        let (plan, boot) = Self::load(&ram, config, cmdline.trim())?;

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let mut vcpus = Vec::new();
        for (i, entry) in plan.entries.iter().enumerate() {
            let vcpu = vm_fd
                .create_vcpu(i as u64)
                .map_err(err("KVM_CREATE_VCPU"))?;
            cpu::set_cpuid(&vcpu, &cpuid, i as u32, tsc_deadline)?;
            if let Some(entry) = entry {
                cpu::enter(&vcpu, entry)?;
            }
            vcpus.push(vcpu);
        }
        memory.attach_vcpu_stats(&vm_fd, &vcpus);
        let api_sock = config.api_sock.clone();
        Ok(Self {
            reclaim_probe: config.reclaim_probe,
            _kvm: kvm,
            vm_fd,
            ram,
            memory,
            balloon,
            steps,
            api_sock,
            vcpus,
            serial_irq,
            boot,
        })
    }

    /// Loads what `config` boots and writes its boot data (and, for Linux, the ACPI tables).
    fn load(
        ram: &GuestRam,
        config: &VmConfig,
        cmdline: &str,
    ) -> Result<(BootPlan, BootSummary), VmmError> {
        match &config.boot {
            BootSource::TestGuest(path) => {
                let plan = test_guest::prepare(ram, path, cmdline, config.vcpus)?;
                let summary = BootSummary {
                    what: format!("test guest {}", path.display()),
                    cmdline: cmdline.to_string(),
                    rsdp: None,
                    initrd: None,
                };
                Ok((plan, summary))
            }
            BootSource::Linux(l) => {
                let rsdp = if l.acpi {
                    let tables =
                        acpi::build(&acpi_platform(config.vcpus)).map_err(VmmError::Acpi)?;
                    Some(acpi::write(ram, &tables).map_err(VmmError::Acpi)?)
                } else {
                    None
                };
                mptable::write(ram, config.vcpus).map_err(VmmError::MpTable)?;
                let (loaded, plan) = linux::prepare(ram, l, cmdline, rsdp, config.vcpus)?;
                let summary = BootSummary {
                    what: format!(
                        "Linux {} ({}, entry {:#x})",
                        l.kernel.display(),
                        loaded.format.describe(),
                        loaded.entry
                    ),
                    cmdline: cmdline.to_string(),
                    rsdp,
                    initrd: loaded.initrd.map(|m| (m.addr, m.size)),
                };
                Ok((plan, summary))
            }
        }
    }

    /// The lines the VMM prints when it starts the guest.
    pub fn describe(&self) -> Vec<String> {
        let b = &self.boot;
        let mut lines = vec![format!(
            "booting {} on {} vCPU(s) with {} of RAM",
            b.what,
            self.vcpus.len(),
            format_size(self.ram.layout().total_bytes())
        )];
        if let Some((addr, size)) = b.initrd {
            lines.push(format!("initrd: {size} bytes at {addr:#x}"));
        }
        if let Some(rsdp) = b.rsdp {
            lines.push(format!("ACPI: RSDP at {rsdp:#x}"));
        }
        lines.push(format!("command line: {}", b.cmdline));
        lines
    }

    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    pub fn memory(&self) -> &Arc<MemoryManager> {
        &self.memory
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    pub fn balloon(&self) -> &Arc<BalloonDevice> {
        &self.balloon
    }

    /// The vCPUs' file descriptors, by index (until `run` takes them).
    pub fn vcpu_fds(&self) -> &[VcpuFd] {
        &self.vcpus
    }

    /// The irqfd COM1 raises its interrupt on (GSI 4).
    pub fn serial_irq(&self) -> &EventFd {
        &self.serial_irq
    }

    pub fn boot(&self) -> &BootSummary {
        &self.boot
    }

    /// Runs the guest until its verdict, all vCPUs stop, a fatal exit, or SIGINT/SIGTERM.
    pub fn run(self) -> Result<RunReport, VmmError> {
        let started = Instant::now();
        let io = PortIo::new(
            SerialPort::new(Box::new(std::io::stdout()), self.serial_irq),
            self.reclaim_probe,
        );
        let shared = Arc::new(
            VmShared::new(
                io,
                self.memory.clone(),
                Some(self.balloon.clone()),
                self.vcpus.len() as u32,
            )
            .map_err(|e| VmmError::EventLoop(e.to_string()))?,
        );
        signals::install_kick_handler()
            .map_err(|e| VmmError::EventLoop(format!("kick handler: {e}")))?;
        let signal_fd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::EventLoop(e.to_string()))?;
        signals::install_shutdown_handlers(&signal_fd)
            .map_err(|e| VmmError::EventLoop(format!("signal handlers: {e}")))?;

        let mut threads = Vec::new();
        for (i, vcpu) in self.vcpus.into_iter().enumerate() {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu::run(vcpu, i as u32, shared))
                .map_err(|err| VmmError::Thread {
                    vcpu: i as u32,
                    err,
                })?;
            threads.push(t);
        }

        let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
        events.add_subscriber(Arc::new(Mutex::new(Lifecycle {
            shared: shared.clone(),
            signal_fd,
        })));
        // Served on its own thread until the VM ends (dropped after the loop).
        let _api = match &self.api_sock {
            Some(path) => Some(
                crate::api::ApiServer::start(
                    path,
                    crate::api::ApiState {
                        balloon: self.balloon.clone(),
                        memory: self.memory.clone(),
                    },
                )
                .map_err(|e| VmmError::Device(format!("control socket {}: {e}", path.display())))?,
            ),
            None => None,
        };
        events.add_subscriber(Arc::new(Mutex::new(BalloonHandler {
            device: self.balloon.clone(),
        })));
        let mut steps = self.steps;
        let mut last_stats = Instant::now();
        while !shared.stop.load(Ordering::Acquire) {
            events
                .run_with_timeout(TICK_MS)
                .map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
            // Housekeeping: the balloon script, and a periodic request for fresh guest
            // statistics.
            steps.tick(&self.balloon);
            if steps.done() {
                self.balloon.steps_pending.store(false, Ordering::Release);
            }
            let every = self.balloon.stats_interval_s();
            if every > 0 && last_stats.elapsed() >= Duration::from_secs(every) {
                self.balloon.request_stats();
                last_stats = Instant::now();
            }
        }

        // Kick every vCPU out of KVM_RUN until its thread has ended.
        for t in threads {
            while !t.is_finished() {
                // SAFETY: the thread is alive (not finished), so its pthread_t is valid.
                unsafe { libc::pthread_kill(t.as_pthread_t(), signals::kick_signal()) };
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = t.join();
        }
        let outcome = shared.take_outcome().unwrap_or(Outcome::VcpusStopped);
        let mut balloon = crate::report::BalloonReport::collect(&self.balloon, &self.memory);
        balloon.steps = steps.into_reports();
        balloon.probes = shared.io.probe_reports();
        drop(self.ram);
        Ok(RunReport {
            outcome,
            elapsed: started.elapsed(),
            balloon,
        })
    }
}

/// Watches the VM's shutdown eventfd and the SIGINT/SIGTERM eventfd.
struct Lifecycle {
    shared: Arc<VmShared>,
    signal_fd: EventFd,
}

impl MutEventSubscriber for Lifecycle {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.shared.shutdown, &self.signal_fd] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                tracing::error!("cannot watch lifecycle eventfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.signal_fd.as_raw_fd() {
            let _ = self.signal_fd.read();
            let sig = signals::last_shutdown_signal().unwrap_or(libc::SIGTERM);
            tracing::info!("received signal {sig}: shutting down");
            self.shared.finish(Outcome::Signal(sig));
        } else {
            let _ = self.shared.shutdown.read();
        }
    }
}

use std::os::fd::AsRawFd;
