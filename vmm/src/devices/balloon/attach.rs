//! The balloon as the VM sees it: a virtio-mmio transport at a fixed address, its interrupt
//! as an irqfd into the in-kernel IOAPIC, and where its queues are processed.
//!
//! Inflate, deflate and stats notifications are MMIO exits handled on the notifying vCPU
//! thread (`mmio_write`): the buffer is recorded and acknowledged before the vCPU re-enters
//! the guest, with no other thread to wake. Measured here, handing each buffer to the event
//! loop through an ioeventfd cost the driver vCPU a context switch and 0.8 ms of run-queue
//! delay per buffer with 4 vCPUs on 2 cores (docs/BENCHMARKS.md, "Where the time went").
//! Free page reports wait for their release before they are returned, so their queue's
//! notifications are an ioeventfd that the event loop serves (`BalloonHandler`), with the
//! device lock dropped while the report is reclaimed. Free page hints are released on the
//! notifying vCPU thread, with the device lock dropped, before the vCPU re-enters the guest
//! (`hinting` says why).

use super::hinting::HintingStatus;
use super::{queue_roles, Balloon, BalloonFeatures, QueueRole, Report};
use crate::devices::virtio::{reg, Effect, Interrupt, MmioTransport, MMIO_SIZE};
use crate::memory::MemoryManager;
use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical address of the balloon's registers (in the MMIO hole).
pub const BALLOON_MMIO_BASE: u64 = 0xd000_0000;
/// The IOAPIC pin (GSI) of its interrupt.
pub const BALLOON_GSI: u32 = 5;

pub struct BalloonDevice {
    pub transport: Mutex<MmioTransport<Balloon>>,
    memory: Arc<MemoryManager>,
    /// The free page reporting queue's notifications (KVM_IOEVENTFD on QueueNotify with
    /// datamatch the index reporting has when the driver negotiates every offered feature;
    /// a driver that numbers it otherwise notifies through MMIO exits, passed on here).
    reports_evt: EventFd,
    /// How often the event loop asks the driver for fresh statistics (0: never).
    stats_interval_s: AtomicU64,
    /// `--balloon-steps` has steps left: the target belongs to the schedule, and
    /// `PATCH /balloon` is refused (409) until it ends.
    pub steps_pending: AtomicBool,
}

/// The hinting endpoints' refusal when the VM was started without hinting.
const HINTING_OFF: &str =
    "free page hinting is not enabled: start the VM with --balloon-free-page-hinting";

/// The statistics polling interval a VM starts with.
pub const DEFAULT_STATS_INTERVAL_S: u64 = 1;

impl BalloonDevice {
    /// Creates the device and wires its notifications and interrupt into KVM.
    pub fn attach(
        vm_fd: &VmFd,
        memory: Arc<MemoryManager>,
        offered: BalloonFeatures,
    ) -> Result<Arc<Self>, String> {
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        vm_fd
            .register_irqfd(&irqfd, BALLOON_GSI)
            .map_err(|e| format!("KVM_IRQFD: {e}"))?;
        let interrupt = Arc::new(Interrupt::new(irqfd));
        let mem = memory.ram.memory().clone();
        let transport = MmioTransport::new(
            Balloon::new(memory.clone(), interrupt.clone(), offered),
            mem,
            interrupt,
        );
        let reports_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let reporting = queue_roles(offered.bits()).position(|r| r == QueueRole::Reporting);
        if let Some(index) = reporting {
            vm_fd
                .register_ioevent(
                    &reports_evt,
                    &IoEventAddress::Mmio(BALLOON_MMIO_BASE + reg::QUEUE_NOTIFY),
                    index as u32,
                )
                .map_err(|e| format!("KVM_IOEVENTFD: {e}"))?;
        }
        Ok(Arc::new(Self {
            transport: Mutex::new(transport),
            memory,
            reports_evt,
            stats_interval_s: AtomicU64::new(DEFAULT_STATS_INTERVAL_S),
            steps_pending: AtomicBool::new(false),
        }))
    }

    /// Sets the target in 4 KiB pages; a change raises the configuration-change interrupt.
    pub fn set_target_pages(&self, pages: u32) {
        let mut t = self.transport.lock().unwrap();
        let changed = t.device_mut().set_num_pages(pages);
        if changed {
            t.config_changed();
        }
        let met = changed && t.device().target_met();
        drop(t);
        if met {
            super::split_at_target(&self.memory);
        }
    }

    /// The kernel command line entry that tells a Linux-style driver where the device is.
    pub fn cmdline_entry() -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            MMIO_SIZE >> 10,
            BALLOON_MMIO_BASE,
            BALLOON_GSI
        )
    }

    pub fn contains(addr: u64) -> bool {
        (BALLOON_MMIO_BASE..BALLOON_MMIO_BASE + MMIO_SIZE).contains(&addr)
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.transport
            .lock()
            .unwrap()
            .read(addr - BALLOON_MMIO_BASE, data);
    }

    /// A register write from a vCPU thread. A queue notification is served here, on that
    /// thread, except for the reporting queue (the event loop's).
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        let mut t = self.transport.lock().unwrap();
        let effect = t.write(addr - BALLOON_MMIO_BASE, data);
        let deferred = serve_inline(&mut t, effect);
        drop(t);
        if let Some(taken) = deferred.hints {
            self.serve_hints(taken);
        }
        if deferred.reports {
            let _ = self.reports_evt.write(1);
        }
    }

    /// Releases the hint buffers this thread's notification took (device lock dropped
    /// meanwhile), then returns them, and goes on while the ring has more; DONE follows once
    /// none is left in flight.
    fn serve_hints(&self, taken: (Vec<Report>, u64)) {
        let mut next = Some(taken);
        while let Some((hints, generation)) = next.take() {
            let reclaimed = Report::reclaim_all(hints, &self.memory);
            next = finish_hints(&mut self.transport.lock().unwrap(), reclaimed, generation);
        }
    }

    /// The device, locked, if it offers free page hinting; else the endpoints' refusal.
    fn hinting(&self) -> Result<MutexGuard<'_, MmioTransport<Balloon>>, &'static str> {
        let t = self.transport.lock().unwrap();
        if t.device().hinting_offered() {
            Ok(t)
        } else {
            Err(HINTING_OFF)
        }
    }

    /// `PATCH /balloon/hinting/start`: a new run (its id in the configuration).
    pub fn start_hinting(&self, acknowledge_on_stop: bool) -> Result<u32, &'static str> {
        let mut t = self.hinting()?;
        let id = t.device_mut().hinting.start(acknowledge_on_stop);
        t.config_changed();
        Ok(id)
    }

    /// `PATCH /balloon/hinting/stop`: DONE, once no hinted buffer is being released.
    pub fn stop_hinting(&self) -> Result<(), &'static str> {
        let mut t = self.hinting()?;
        if t.device_mut().hinting.stop() {
            t.config_changed();
        }
        Ok(())
    }

    /// `GET /balloon/hinting/status`.
    pub fn hinting_status(&self) -> Result<HintingStatus, &'static str> {
        Ok(self.hinting()?.device().hinting.status())
    }

    /// Serves the free page reports the driver has made available: parsed with the device
    /// lock held, reclaimed without it (the vCPUs' register accesses never wait for a batch),
    /// then returned to the driver.
    pub fn serve_reports(&self) {
        loop {
            let (mut reports, generation, index) = {
                let mut t = self.transport.lock().unwrap();
                let Some(index) = t.device().index_of(QueueRole::Reporting) else {
                    return;
                };
                t.process_queue(index);
                let (reports, generation) = t.device_mut().drain_reports();
                (reports, generation, index)
            };
            if reports.is_empty() {
                return;
            }
            for r in &mut reports {
                r.reclaim(&self.memory);
            }
            let mut t = self.transport.lock().unwrap();
            t.with_device_and_queue(index, |dev, q, mem| {
                dev.complete_reports(reports, generation, q, mem)
            });
        }
    }

    pub fn stats_interval_s(&self) -> u64 {
        self.stats_interval_s.load(Ordering::Relaxed)
    }

    pub fn set_stats_interval_s(&self, s: u64) {
        self.stats_interval_s.store(s, Ordering::Relaxed);
    }

    /// Asks the driver for fresh statistics.
    pub fn request_stats(&self) {
        let mut t = self.transport.lock().unwrap();
        if t.is_active() {
            if let Some(index) = t.device().index_of(QueueRole::Stats) {
                t.with_device_and_queue(index, |dev, q, mem| dev.request_stats(q, mem));
            }
        }
    }
}

/// What `serve_inline` left to do: the hint buffers this notification took (and their
/// device generation), for the same thread to release with the device lock dropped
/// (`serve_hints`, or `serve_hints_exclusive`); and reports, for the event loop.
#[derive(Default)]
pub struct Deferred {
    pub hints: Option<(Vec<Report>, u64)>,
    pub reports: bool,
}

/// What a register write's effect asks of the writing vCPU thread: inflate, deflate and stats
/// notifications are served here and now, hint buffers taken here and released by the
/// caller on this thread; a reporting notification is left for the event loop. DRIVER_OK
/// serves every queue once, since a driver may make buffers available and notify before it.
/// (Shared by the VMM and the fuzz targets.)
pub fn serve_inline(t: &mut MmioTransport<Balloon>, effect: Option<Effect>) -> Deferred {
    let mut deferred = Deferred::default();
    let queues: Vec<usize> = match effect {
        None => Vec::new(),
        Some(Effect::Notify(q)) if q < t.num_queues() => vec![q],
        Some(Effect::Notify(q)) => {
            tracing::warn!("balloon: notify for nonexistent queue {q} ignored");
            Vec::new()
        }
        Some(Effect::Activated) => (0..t.num_queues()).collect(),
    };
    for q in queues {
        match t.device().role(q) {
            Some(QueueRole::Reporting) => deferred.reports = true,
            Some(QueueRole::Hinting) => {
                t.process_queue(q);
                // Taken here, under the lock: the buffers this thread popped are the ones
                // it releases before re-entering the guest, never another vCPU's.
                let (hints, generation) = t.device_mut().drain_hints();
                if !hints.is_empty() {
                    deferred.hints = Some((hints, generation));
                }
            }
            _ => t.process_queue(q),
        }
    }
    deferred
}

/// Returns released hint buffers to the driver and writes DONE if it is now owed; then
/// takes the buffers the ring still holds (those past one RAM's worth of frames), if any,
/// for the caller's next round.
pub fn finish_hints(
    t: &mut MmioTransport<Balloon>,
    reclaimed: Vec<Report>,
    generation: u64,
) -> Option<(Vec<Report>, u64)> {
    let index = t.device().index_of(QueueRole::Hinting)?;
    let mut changed = false;
    t.with_device_and_queue(index, |dev, q, mem| {
        changed = dev.complete_hints(reclaimed, generation, q, mem)
    });
    if changed {
        t.config_changed();
    }
    t.process_queue(index);
    let (hints, generation) = t.device_mut().drain_hints();
    (!hints.is_empty()).then_some((hints, generation))
}

/// Serves free page reports on the event loop when their ioeventfd fires.
pub struct BalloonHandler {
    pub device: Arc<BalloonDevice>,
}

impl MutEventSubscriber for BalloonHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.device.reports_evt, EventSet::IN)) {
            tracing::error!("balloon: cannot watch free page report notifications: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        debug_assert_eq!(self.device.reports_evt.as_raw_fd(), events.fd());
        let _ = self.device.reports_evt.read();
        self.device.serve_reports();
    }
}
