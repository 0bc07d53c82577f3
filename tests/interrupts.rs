//! The devices' interrupts reach a local APIC through the in-kernel irqchip, on real KVM:
//! the balloon's configuration-change interrupt (raised as a new target is set, through its
//! irqfd on GSI 5) and COM1's (its irqfd on GSI 4). The I/O APIC pins are programmed as
//! Linux programs them (fixed delivery, physical destination APIC 0, edge, active high,
//! unmasked) with KVM_SET_IRQCHIP, vCPU 0's local APIC is software-enabled with
//! KVM_SET_LAPIC, and delivery is read back as the vector's bit in its IRR (KVM_GET_LAPIC).
//! No guest runs: this checks the VMM's wiring, which a Linux guest relies on (it does not
//! poll the balloon's used rings).

mod common;

use common::Need;
use kvm_bindings::{kvm_irqchip, kvm_lapic_state, KVM_IRQCHIP_IOAPIC};
use vmm::config::{BootSource, VmConfig};
use vmm::devices::balloon::BALLOON_GSI;
use vmm::devices::serial::COM1_GSI;
use vmm::Vm;

const APIC_SVR: usize = 0xf0;
const APIC_IRR: usize = 0x200;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b: Vec<u8> = l.regs[off..off + 4].iter().map(|&c| c as u8).collect();
    u32::from_le_bytes(b.try_into().unwrap())
}

fn pending(vm: &Vm, vector: u8) -> bool {
    let l = vm.vcpu_fds()[0].get_lapic().unwrap();
    let v = vector as usize;
    lapic_reg(&l, APIC_IRR + 0x10 * (v / 32)) & (1 << (v % 32)) != 0
}

/// Whether `vector` becomes pending within a second: KVM injects an irqfd routed to the
/// I/O APIC from a work item, not in the write that signals it.
fn arrives(vm: &Vm, vector: u8) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(1) {
        if pending(vm, vector) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

/// Routes I/O APIC pin `gsi` to `vector` on APIC 0, edge, unmasked.
fn route(vm: &Vm, gsi: u32, vector: u8) {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.vm_fd().get_irqchip(&mut chip).unwrap();
    // SAFETY: chip_id is the I/O APIC, so `ioapic` is the union member KVM filled.
    unsafe { chip.chip.ioapic.redirtbl[gsi as usize].bits = vector as u64 };
    vm.vm_fd().set_irqchip(&chip).unwrap();
}

#[test]
fn balloon_and_serial_interrupts_reach_the_local_apic() {
    require!(
        "balloon_and_serial_interrupts_reach_the_local_apic",
        Need::Kvm
    );
    let config = VmConfig {
        boot: BootSource::TestGuest(common::guest("memtouch")),
        vcpus: 2,
        memory: 64 << 20,
        cmdline: String::new(),
        kvm_device: "/dev/kvm".into(),
        reclaim: guest_mm::ReclaimConfig::default(),
        balloon_steps: Vec::new(),
        balloon_step_timeout: std::time::Duration::from_secs(1),
        balloon_features: Default::default(),
        api_sock: None,
        reclaim_probe: false,
        keep_host_fault_around: false,
        backing: guest_mm::Backing::Memfd,
    };
    let vm = Vm::new(&config).unwrap();
    let vcpu = &vm.vcpu_fds()[0];
    let mut lapic = vcpu.get_lapic().unwrap();
    for (i, b) in 0x1ffu32.to_le_bytes().iter().enumerate() {
        lapic.regs[APIC_SVR + i] = *b as _;
    }
    vcpu.set_lapic(&lapic).unwrap();
    let (balloon_vector, serial_vector) = (0x35, 0x34);
    route(&vm, BALLOON_GSI, balloon_vector);
    route(&vm, COM1_GSI, serial_vector);
    assert!(!pending(&vm, balloon_vector) && !pending(&vm, serial_vector));

    vm.balloon().set_target_pages(1024);
    assert!(
        arrives(&vm, balloon_vector),
        "a new balloon target did not reach vCPU 0's local APIC"
    );
    assert!(
        !pending(&vm, serial_vector),
        "GSI 5 must not show up as GSI 4"
    );

    vm.serial_irq().write(1).unwrap();
    assert!(
        arrives(&vm, serial_vector),
        "COM1's interrupt did not reach vCPU 0's local APIC"
    );
}
