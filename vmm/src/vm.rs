//! A VM: KVM VM fd, memfd-backed RAM in memslots, the in-kernel irqchip, the loaded guest and
//! its vCPUs; `run` drives it to the guest's verdict from an event-manager loop.

use crate::boot::{self, BootImage};
use crate::config::VmConfig;
use crate::devices::balloon::steps::BalloonSteps;
use crate::devices::balloon::{BalloonDevice, BalloonHandler};
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
/// Event loop tick: bounds how late a gather window or a balloon step is noticed.
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
    image: BootImage,
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
        if config.vcpus > GUEST_MAX_VCPUS {
            return Err(VmmError::TooManyGuestVcpus {
                requested: config.vcpus,
                max: GUEST_MAX_VCPUS,
            });
        }
        guest_mm::Layout::new(config.memory)?;

        let vm_fd = kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
        let ram = Arc::new(GuestRam::with_backend(
            config.memory,
            &config.memory_backend,
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

        let memory = Arc::new(MemoryManager::for_vm(ram.clone(), &vm_fd, config.gather));
        let balloon = BalloonDevice::attach(&vm_fd, memory.clone()).map_err(VmmError::Device)?;
        let steps = BalloonSteps::new(config.balloon_steps.clone(), config.balloon_step_timeout);

        let image = boot::load_guest(&ram, &config.guest)?;
        let cr3 = boot::write_page_tables(&ram)?;
        boot::write_gdt(&ram)?;
        let cmdline = format!("{} {}", config.cmdline, BalloonDevice::cmdline_entry());
        let start_info = boot::write_start_info(&ram, cmdline.trim())?;

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for i in 0..config.vcpus {
            let vcpu = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(err("KVM_CREATE_VCPU"))?;
            boot::setup_vcpu(&vcpu, &cpuid, i, config.vcpus, image.entry, start_info, cr3)?;
            // With the in-kernel irqchip, application processors wait for INIT/SIPI; ours start
            // directly at the 64-bit entry like the boot processor.
            let runnable = kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            };
            vcpu.set_mp_state(runnable)
                .map_err(err("KVM_SET_MP_STATE"))?;
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
            image,
        })
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

    pub fn image(&self) -> &BootImage {
        &self.image
    }

    /// Runs the guest until its verdict, all vCPUs stop, a fatal exit, or SIGINT/SIGTERM.
    pub fn run(self) -> Result<RunReport, VmmError> {
        let started = Instant::now();
        let io = PortIo::new(
            SerialPort::new(Box::new(std::io::stdout())),
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
            // Housekeeping: a gather batch whose window has passed, the balloon script, and a
            // periodic request for fresh guest statistics.
            let _ = self.memory.gather.lock().unwrap().poll();
            steps.tick(&self.balloon);
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
        let balloon = crate::report::BalloonReport::collect(&self.balloon, &self.memory);
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
