//! The allocator the plugin modules run on: free lists of small blocks in
//! front of the system allocator (wasi-libc's dlmalloc).
//!
//! A request through the bundle makes some 500 small allocations (serde's
//! strings and vectors, header pairs, the stages' scratch), and every one is
//! freed by the end of the request. dlmalloc pays for splitting, binning and
//! coalescing on each of them. Here a freed block of up to [`MAX_SMALL`]
//! bytes goes on the free list of its size class instead, and the next
//! allocation of that class takes it back: a pop and a push, with the size
//! read from the `Layout` Rust passes to `dealloc`, so blocks carry no
//! header. Measured with `./scripts/bench.sh --instructions 100 --rows
//! bundle` (Envoy's instructions per request): 672.5k → about 640k for a
//! JSON answer, 995.5k → about 950k for a stream.
//!
//! Bounded: a class keeps at most [`KEEP_BYTES`] of free blocks and hands
//! the rest back to dlmalloc, so the lists hold at most
//! `CLASSES * KEEP_BYTES` (4 MiB) per VM, and in practice what one request
//! had live at its peak. Larger blocks (bodies, buffers) go to dlmalloc
//! directly, which can grow them in place.
//!
//! Sound only where there is one thread: a proxy-wasm VM (wasm32 without the
//! atomics feature). [`Cached`] is `Sync`, as a global allocator must be,
//! only there; elsewhere it can be used as a value (the tests do), not
//! installed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// The size classes: multiples of [`STEP`] up to [`MAX_SMALL`].
const STEP: usize = 16;
const CLASSES: usize = 64;
/// The largest block served from the lists. Larger classes were tried
/// (powers of two up to 64 KiB) and cost more: a growing buffer is then
/// copied from class to class instead of grown in place by dlmalloc.
pub const MAX_SMALL: usize = STEP * CLASSES;
/// Free bytes one class keeps before it hands blocks back to dlmalloc.
pub const KEEP_BYTES: usize = 64 * 1024;

struct Lists {
    /// The first free block of each class; each free block holds the next.
    heads: [*mut u8; CLASSES],
    /// Bytes on each list.
    kept: [usize; CLASSES],
}

/// Small blocks from free lists, the rest from [`System`].
pub struct Cached(UnsafeCell<Lists>);

// SAFETY: a proxy-wasm VM runs one thread (wasm32 without atomics), so the
// lists are never reached from two threads at once.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
unsafe impl Sync for Cached {}

impl Cached {
    pub const fn new() -> Cached {
        Cached(UnsafeCell::new(Lists {
            heads: [ptr::null_mut(); CLASSES],
            kept: [0; CLASSES],
        }))
    }
}

impl Default for Cached {
    fn default() -> Self {
        Cached::new()
    }
}

/// The class of a layout the lists serve; `None` for a large or
/// over-aligned one.
#[inline]
fn class(layout: Layout) -> Option<usize> {
    (layout.size() <= MAX_SMALL && layout.align() <= STEP)
        .then(|| layout.size().max(1).div_ceil(STEP) - 1)
}

/// The bytes of a block of class `k`.
#[inline]
fn size(k: usize) -> usize {
    (k + 1) * STEP
}

/// The layout every block of class `k` is allocated with from [`System`]
/// (only when a list is empty or full, so its check costs little).
#[inline]
fn block(k: usize) -> Layout {
    // (k + 1) * STEP is at most MAX_SMALL and STEP is a power of two.
    Layout::from_size_align((k + 1) * STEP, STEP).unwrap_or(Layout::new::<u8>())
}

// SAFETY: every block handed out is at least the layout's size (its class's
// size) and aligned to at least the layout's alignment (STEP, which the
// lists' layouts do not exceed; the rest come from System as asked). A block
// is on a list only after it was freed, and leaves it when handed out, so no
// block is handed out twice. Blocks on the lists were allocated from System
// with their class's layout and go back to it with the same.
unsafe impl GlobalAlloc for Cached {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(k) = class(layout) else {
            // SAFETY: the caller's layout, as the caller gave it.
            return unsafe { System.alloc(layout) };
        };
        // SAFETY: one thread (see `Sync`), and no reference to the lists
        // outlives a call.
        let lists = unsafe { &mut *self.0.get() };
        let head = lists.heads[k];
        if head.is_null() {
            // SAFETY: a non-zero size and a power-of-two alignment.
            return unsafe { System.alloc(block(k)) };
        }
        // SAFETY: a free block of this class holds the next one in its
        // first bytes (STEP-aligned, at least STEP bytes long).
        lists.heads[k] = unsafe { head.cast::<*mut u8>().read() };
        lists.kept[k] -= size(k);
        head
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(k) = class(layout) else {
            // SAFETY: a large block came from System with this layout.
            return unsafe { System.dealloc(ptr, layout) };
        };
        // SAFETY: as in `alloc`.
        let lists = unsafe { &mut *self.0.get() };
        if lists.kept[k] >= KEEP_BYTES {
            // SAFETY: every small block came from System as `block(k)`.
            return unsafe { System.dealloc(ptr, block(k)) };
        }
        // SAFETY: the block is the caller's no more, at least STEP bytes
        // long and STEP-aligned: its first bytes hold the list's link.
        unsafe { ptr.cast::<*mut u8>().write(lists.heads[k]) };
        lists.heads[k] = ptr;
        lists.kept[k] += size(k);
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else {
            return ptr::null_mut();
        };
        match (class(layout), class(new)) {
            // The block is already big enough (and no bigger than the class).
            (Some(a), Some(b)) if a == b => ptr,
            // SAFETY: a large block came from System with this layout.
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            _ => {
                // SAFETY: `new` has a non-zero size (the caller's contract).
                let moved = unsafe { self.alloc(new) };
                if !moved.is_null() {
                    // SAFETY: both blocks hold at least the smaller size, and
                    // are distinct (the old one is still allocated).
                    unsafe { ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size)) };
                    // SAFETY: the old block, with the layout it was asked with.
                    unsafe { self.dealloc(ptr, layout) };
                }
                moved
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator: the tests need no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap_or(Layout::new::<u8>())
    }

    #[test]
    fn classes_cover_every_small_size_and_no_large_one() {
        assert_eq!(class(layout(1, 1)), Some(0));
        assert_eq!(class(layout(16, 8)), Some(0));
        assert_eq!(class(layout(17, 8)), Some(1));
        assert_eq!(class(layout(MAX_SMALL, 16)), Some(CLASSES - 1));
        assert_eq!(class(layout(MAX_SMALL + 1, 1)), None);
        assert_eq!(class(layout(64, 32)), None, "over-aligned");
        for size in 1..=MAX_SMALL {
            let k = class(layout(size, 1)).unwrap_or(usize::MAX);
            assert!(block(k).size() >= size && block(k).size() < size + STEP);
        }
    }

    /// Random allocations, frees and reallocations, each block filled with
    /// a pattern of its own: no block is handed out twice or clobbered,
    /// reallocation keeps the contents, and alignment is kept.
    #[test]
    fn blocks_are_never_shared_and_keep_their_contents() {
        let a = Cached::new();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
        let check = |p: *mut u8, l: Layout, tag: u8| {
            // SAFETY: `p` is a live block of `l.size()` bytes.
            let bytes = unsafe { std::slice::from_raw_parts(p, l.size()) };
            assert!(
                bytes.iter().all(|b| *b == tag),
                "block of {} clobbered",
                l.size()
            );
            assert_eq!(p as usize % l.align(), 0);
        };
        for step in 0..20_000u32 {
            let r = rng.next();
            let tag = (step % 251) as u8;
            match r % 4 {
                0 | 1 if live.len() < 400 => {
                    let size = match r % 11 {
                        0 => 2000 + (r >> 8) as usize % 3000,
                        _ => 1 + (r >> 8) as usize % (MAX_SMALL + 64),
                    };
                    let l = layout(size, [1, 2, 4, 8, 16, 32][(r >> 40) as usize % 6]);
                    // SAFETY: a non-zero size.
                    let p = unsafe { a.alloc(l) };
                    assert!(!p.is_null());
                    // SAFETY: a fresh block of `size` bytes.
                    unsafe { p.write_bytes(tag, size) };
                    live.push((p, l, tag));
                }
                2 if !live.is_empty() => {
                    let (p, l, t) = live.swap_remove((r >> 8) as usize % live.len());
                    check(p, l, t);
                    // SAFETY: a live block with its layout.
                    unsafe { a.dealloc(p, l) };
                }
                _ if !live.is_empty() => {
                    let i = (r >> 8) as usize % live.len();
                    let (p, l, t) = live[i];
                    check(p, l, t);
                    let size = 1 + (r >> 20) as usize % (2 * MAX_SMALL);
                    // SAFETY: a live block with its layout; a non-zero size.
                    let q = unsafe { a.realloc(p, l, size) };
                    assert!(!q.is_null());
                    let nl = layout(size, l.align());
                    let kept = l.size().min(size);
                    // SAFETY: `q` holds `size` bytes, the first `kept` copied.
                    let bytes = unsafe { std::slice::from_raw_parts(q, kept) };
                    assert!(bytes.iter().all(|b| *b == t), "realloc lost contents");
                    // SAFETY: as above.
                    unsafe { q.write_bytes(tag, size) };
                    live[i] = (q, nl, tag);
                }
                _ => {}
            }
        }
        for (p, l, t) in live {
            check(p, l, t);
            // SAFETY: a live block with its layout.
            unsafe { a.dealloc(p, l) };
        }
        // SAFETY: the test owns `a`; no block is live.
        let lists = unsafe { &*a.0.get() };
        assert!(lists.kept.iter().all(|k| *k <= KEEP_BYTES + MAX_SMALL));
    }

    #[test]
    fn a_class_keeps_a_bounded_number_of_free_bytes() {
        let a = Cached::new();
        let l = layout(100, 8);
        // SAFETY: non-zero sizes; every block is freed with its layout.
        let blocks: Vec<*mut u8> = (0..10_000).map(|_| unsafe { a.alloc(l) }).collect();
        for p in &blocks {
            // SAFETY: as above.
            unsafe { a.dealloc(*p, l) };
        }
        // SAFETY: the test owns `a`.
        let lists = unsafe { &*a.0.get() };
        let k = class(l).unwrap_or(0);
        assert!(lists.kept[k] >= KEEP_BYTES && lists.kept[k] < KEEP_BYTES + block(k).size());
        // What is kept comes back first, most recently freed first.
        // SAFETY: a non-zero size.
        let again = unsafe { a.alloc(l) };
        assert!(blocks.contains(&again));
    }
}
