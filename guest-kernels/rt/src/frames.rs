//! A frame allocator over the RAM the boot protocol reports: one bit per 4 KiB frame
//! (1 = free), kept in the first frames after the guest image. Memory below 1 MiB (boot
//! structures, the VMM's page tables) and the image itself are never handed out.

use crate::bootinfo::BootInfo;
use crate::sync::SpinLock;

pub const PAGE_SIZE: u64 = 4096;
const LOW_RESERVED: u64 = 1 << 20;

extern "C" {
    static __image_end: u8;
}

struct Frames {
    bitmap: *mut u64,
    words: usize,
    base_pfn: u64,
    first_free: u64,
    free: u64,
    total: u64,
    hint: usize,
}

// SAFETY: the bitmap is only touched under the lock.
unsafe impl Send for Frames {}

static FRAMES: SpinLock<Frames> = SpinLock::new(Frames {
    bitmap: core::ptr::null_mut(),
    words: 0,
    base_pfn: 0,
    first_free: 0,
    free: 0,
    total: 0,
    hint: 0,
});

fn image_end() -> u64 {
    // SAFETY: only the address of the linker symbol is taken.
    unsafe { &__image_end as *const u8 as u64 }
}

/// Builds the bitmap. Called once by the boot vCPU before guest code runs.
pub(crate) fn init(boot: &BootInfo) {
    let lo = image_end().max(LOW_RESERVED).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let hi = boot.ram().iter().map(|r| r.end).max().unwrap_or(0);
    if hi <= lo {
        return;
    }
    let base_pfn = lo / PAGE_SIZE;
    let span = (hi / PAGE_SIZE) - base_pfn;
    let words = span.div_ceil(64) as usize;
    let bitmap_pages = (words as u64 * 8).div_ceil(PAGE_SIZE);
    let bitmap = lo as *mut u64;
    // SAFETY: [lo, lo + words*8) is RAM above the image that nobody else uses.
    unsafe { core::ptr::write_bytes(bitmap, 0, words) };
    let mut f = FRAMES.lock();
    f.bitmap = bitmap;
    f.words = words;
    f.base_pfn = base_pfn;
    let first_free = base_pfn + bitmap_pages;
    f.first_free = first_free;
    for r in boot.ram() {
        let s = (r.start.div_ceil(PAGE_SIZE)).max(first_free);
        let e = r.end / PAGE_SIZE;
        for pfn in s..e.max(s) {
            let i = (pfn - base_pfn) as usize;
            // SAFETY: i < span, within the bitmap.
            unsafe { *bitmap.add(i / 64) |= 1 << (i % 64) };
            f.free += 1;
        }
    }
    f.total = f.free;
}

/// Allocates one frame; returns its PFN.
pub fn alloc() -> Option<u64> {
    alloc_run(1).map(|(pfn, _)| pfn)
}

/// Allocates up to `max` consecutive frames starting at the lowest free one.
/// Returns the first PFN and how many frames were taken.
pub fn alloc_run(max: u64) -> Option<(u64, u64)> {
    let mut f = FRAMES.lock();
    let f = &mut *f;
    let mut w = f.hint;
    while w < f.words {
        // SAFETY: w < words.
        let word = unsafe { *f.bitmap.add(w) };
        if word != 0 {
            break;
        }
        w += 1;
    }
    if w >= f.words {
        return None;
    }
    f.hint = w;
    // SAFETY: w < words.
    let first = w * 64 + unsafe { (*f.bitmap.add(w)).trailing_zeros() } as usize;
    let mut n = 0u64;
    let mut i = first;
    while n < max && i < f.words * 64 {
        // SAFETY: i / 64 < words.
        let word = unsafe { &mut *f.bitmap.add(i / 64) };
        if *word & (1 << (i % 64)) == 0 {
            break;
        }
        *word &= !(1 << (i % 64));
        n += 1;
        i += 1;
    }
    f.free -= n;
    Some((f.base_pfn + first as u64, n))
}

/// Returns a frame to the allocator. Returns false (and changes nothing) for a PFN the
/// allocator does not own or that is already free.
pub fn free(pfn: u64) -> bool {
    let in_ram = crate::bootinfo::get()
        .ram()
        .iter()
        .any(|r| pfn >= r.start.div_ceil(PAGE_SIZE) && pfn < r.end / PAGE_SIZE);
    let mut f = FRAMES.lock();
    if !in_ram || pfn < f.first_free || pfn - f.base_pfn >= f.words as u64 * 64 {
        return false;
    }
    let i = (pfn - f.base_pfn) as usize;
    // SAFETY: i / 64 < words.
    let word = unsafe { &mut *f.bitmap.add(i / 64) };
    if *word & (1 << (i % 64)) != 0 {
        return false;
    }
    *word |= 1 << (i % 64);
    f.free += 1;
    if i / 64 < f.hint {
        f.hint = i / 64;
    }
    true
}

pub fn free_count() -> u64 {
    FRAMES.lock().free
}

pub fn total_count() -> u64 {
    FRAMES.lock().total
}
