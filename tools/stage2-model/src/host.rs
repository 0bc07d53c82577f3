//! Host frames: who owns each, what it holds, whether the host knows it is dirty, and an
//! allocator that hands a freed frame to its next owner at once.
//!
//! Immediate reuse is what makes a use-after-free observable: the moment the guest's frame is
//! freed it belongs to another tenant (another VM, the host's page cache) whose data is in it,
//! so a late write through a stale translation lands in somebody else's page, and the checker
//! sees an access by the guest to a frame it does not own.

/// Who holds a host frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Free,
    /// Backs this guest frame.
    Guest(u64),
    /// Another tenant, numbered in the order frames were handed out.
    Other(u32),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Free => f.write_str("nobody (free)"),
            Owner::Guest(g) => write!(f, "the guest (gfn {g:#x})"),
            Owner::Other(t) => write!(f, "tenant #{t}"),
        }
    }
}

/// The content another tenant writes into a frame it receives.
pub fn tenant_marker(tenant: u32) -> u64 {
    0xdead_0000_0000_0000 | u64::from(tenant)
}

#[derive(Clone, Debug)]
pub struct HostFrames {
    owner: Vec<Owner>,
    content: Vec<u64>,
    /// The host's dirty flag for the page (PageDirty): set when a dirty bit is taken from the
    /// stage-2 table, cleared by writeback.
    dirty: Vec<bool>,
    free: Vec<u64>,
    tenants: u32,
}

impl HostFrames {
    /// `n` frames, all free.
    pub fn new(n: u64) -> Self {
        Self {
            owner: vec![Owner::Free; n as usize],
            content: vec![0; n as usize],
            dirty: vec![false; n as usize],
            free: (0..n).rev().collect(),
            tenants: 0,
        }
    }

    pub fn owner(&self, hfn: u64) -> Owner {
        self.owner[hfn as usize]
    }

    pub fn content(&self, hfn: u64) -> u64 {
        self.content[hfn as usize]
    }

    pub fn write(&mut self, hfn: u64, value: u64) {
        self.content[hfn as usize] = value;
    }

    pub fn is_dirty(&self, hfn: u64) -> bool {
        self.dirty[hfn as usize]
    }

    pub fn set_dirty(&mut self, hfn: u64, dirty: bool) {
        self.dirty[hfn as usize] = dirty;
    }

    /// Takes a specific free frame (initial layout).
    pub fn claim(&mut self, hfn: u64, owner: Owner) {
        self.free.retain(|&f| f != hfn);
        self.owner[hfn as usize] = owner;
    }

    /// A frame for `owner`: a free one if there is one, else the oldest other tenant gives
    /// one back (the host reclaims it) so the guest never starves.
    pub fn alloc(&mut self, owner: Owner) -> u64 {
        let hfn = self.free.pop().unwrap_or_else(|| {
            (0..self.owner.len() as u64)
                .filter(|&f| matches!(self.owner(f), Owner::Other(_)))
                .min_by_key(|&f| match self.owner(f) {
                    Owner::Other(t) => t,
                    _ => u32::MAX,
                })
                .expect("host out of frames: the configuration needs spare frames")
        });
        self.owner[hfn as usize] = owner;
        self.dirty[hfn as usize] = false;
        hfn
    }

    /// Frees `hfn` and hands it to the next tenant at once, who fills it with its own data.
    pub fn free_and_reuse(&mut self, hfn: u64) -> Owner {
        self.dirty[hfn as usize] = false;
        let t = self.tenants;
        self.tenants += 1;
        let owner = Owner::Other(t);
        self.owner[hfn as usize] = owner;
        self.content[hfn as usize] = tenant_marker(t);
        owner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_frame_belongs_to_another_tenant_at_once_and_is_reclaimed_when_short() {
        let mut h = HostFrames::new(2);
        h.claim(0, Owner::Guest(7));
        let f = h.alloc(Owner::Guest(8));
        assert_eq!(f, 1);
        assert_eq!(h.free_and_reuse(0), Owner::Other(0));
        assert_eq!(h.content(0), tenant_marker(0));
        // No free frame left: tenant #0 gives its frame back.
        assert_eq!(h.alloc(Owner::Guest(9)), 0);
        assert_eq!(h.owner(0), Owner::Guest(9));
    }
}
