use std::collections::BTreeSet;

use super::*;

/// A kind fingerprint no handle type has, so that these tests' cells are
/// told apart from the handles other tests create in the same arenas.
const KIND: u32 = 0xffff_ff00;

fn cell(len: usize) -> Arc<Block> {
    create("unit-arena", len, 8, KIND).expect("create")
}

fn receive(block: &Block, place: Place, len: usize, kind: u32) -> io::Result<Arc<Block>> {
    receive_cell(block.fd(), place, len, kind)
}

#[test]
fn classes_hold_the_object_and_its_trailer() {
    assert_eq!(class_for(1, 1), Some(0));
    assert_eq!(class_for(48, 8), Some(0));
    assert_eq!(class_for(49, 8), Some(1));
    assert_eq!(class_for(MAX_OBJECT, 8), Some(CLASSES - 1));
    assert_eq!(class_for(MAX_OBJECT + 1, 8), None);
    assert_eq!(class_for(0, 8), None);
    assert_eq!(class_for(16, 128), None);
    for class in 0..CLASSES {
        let (cell, cells) = geometry(class);
        assert!(CELLS_AT + cell * cells as usize <= ARENA_BYTES);
    }
}

#[test]
fn a_cell_that_never_left_is_reused_and_zeroed() {
    let mut seen = BTreeSet::new();
    for i in 0..20_000u64 {
        let block = cell(2000);
        assert_eq!(block.atomics_u64()[3].load(Ordering::Relaxed), 0, "zeroed");
        block.atomics_u64()[3].store(i + 1, Ordering::Relaxed);
        seen.insert((block.file(), block.place().offset));
    }
    // Other tests may allocate in the same class meanwhile; without reuse
    // this would be 20 000 cells.
    assert!(seen.len() < 64, "{} cells used", seen.len());
}

#[test]
fn a_cell_that_was_sent_is_never_reused_here() {
    let block = cell(1500);
    block.sent();
    let (file, place) = (block.file(), block.place());
    drop(block);
    for _ in 0..300 {
        let other = cell(1500);
        assert_ne!((other.file(), other.place()), (file, place));
        other.sent();
    }
}

#[test]
fn a_received_cell_is_the_same_object() {
    let block = cell(24);
    block.sent();
    block.atomics_u64()[0].store(42, Ordering::Relaxed);
    let again = receive(&block, block.place(), 24, KIND).expect("receive");
    assert!(Arc::ptr_eq(&block, &again), "one object per cell here");
    // Dropped here, then received again (its sender still holds it).
    let place = block.place();
    let fd = block.fd().try_clone_to_owned().expect("dup");
    drop((block, again));
    let back = receive_cell(fd.as_fd(), place, 24, KIND).expect("receive");
    assert_eq!(back.atomics_u64()[0].load(Ordering::Relaxed), 42);
}

use std::os::fd::AsFd;

#[test]
fn forged_places_are_errors() {
    let block = cell(24);
    block.sent();
    let good = block.place();
    let refused = |place: Place, len: usize, kind: u32| {
        receive(&block, place, len, kind)
            .map(drop)
            .expect_err("refused")
            .to_string()
    };
    let at = |offset: u64| Place {
        offset,
        stamp: good.stamp,
    };
    for offset in [
        good.offset + 8,
        good.offset + 1,
        0,
        8,
        ARENA_BYTES as u64,
        u64::MAX,
    ] {
        let msg = refused(at(offset), 24, KIND);
        assert!(
            msg.contains("not where one of its cells"),
            "{offset}: {msg}"
        );
    }
    let msg = refused(good, 200, KIND);
    assert!(msg.contains("in an arena of cells of 64 bytes"), "{msg}");
    let msg = refused(good, 40, KIND);
    assert!(msg.contains("holds as another object"), "{msg}");
    let msg = refused(good, 24, KIND ^ 1);
    assert!(msg.contains("holds as another object"), "{msg}");
    let msg = refused(
        Place {
            stamp: good.stamp ^ 1,
            ..good
        },
        24,
        KIND,
    );
    assert!(msg.contains("holds as another object"), "{msg}");
    // The last cell of an arena of this process, never allocated: an arena
    // of its own, since other tests of this binary allocate from (and may
    // fill) the class's shared ones meanwhile.
    let own = Arena::create(0).expect("arena");
    let first = own.alloc(24, KIND).expect("alloc").expect("a free cell");
    let (cell_bytes, cells) = geometry(0);
    let last = Place {
        offset: (CELLS_AT + (cells as usize - 1) * cell_bytes) as u64,
        stamp: first.place().stamp,
    };
    let msg = receive(&first, last, 24, KIND)
        .map(drop)
        .expect_err("refused")
        .to_string();
    assert!(msg.contains("holds no object"), "{msg}");
    // A cell freed here (never sent): it holds nothing for anyone.
    let lone = own.alloc(24, KIND).expect("alloc").expect("a free cell");
    let lone_place = lone.place();
    let lone_fd = lone.fd().try_clone_to_owned().expect("dup");
    drop(lone);
    let msg = receive_cell(lone_fd.as_fd(), lone_place, 24, KIND)
        .map(drop)
        .expect_err("refused")
        .to_string();
    assert!(msg.contains("holds no object"), "{msg}");
    // Without a stamp.
    let msg = refused(at(good.offset).with_stamp(0), 24, KIND);
    assert!(msg.contains("without a stamp"), "{msg}");
}

impl Place {
    fn with_stamp(self, stamp: u64) -> Place {
        Place { stamp, ..self }
    }
}

#[test]
fn a_file_is_an_arena_or_an_object_never_both() {
    // An arena's memfd offered as an object of its own.
    let block = cell(24);
    let fd = block.fd().try_clone_to_owned().expect("dup");
    let msg = receive_own(fd, ARENA_BYTES)
        .map(drop)
        .expect_err("refused")
        .to_string();
    assert!(msg.contains("maps as an arena"), "{msg}");
    // An object's memfd (with an arena's header, written by a peer)
    // offered as an arena.
    let map = Mapping::create("unit-fake-arena", ARENA_BYTES).expect("memfd");
    map.atomics_u64()[H_MAGIC].store(MAGIC, Ordering::Relaxed);
    map.atomics_u64()[H_GEOMETRY].store(geometry_word(0), Ordering::Relaxed);
    let place = Place {
        offset: CELLS_AT as u64,
        stamp: 1,
    };
    let msg = receive_cell(map.fd(), place, 24, KIND)
        .map(drop)
        .expect_err("refused")
        .to_string();
    assert!(msg.contains("maps as another shared memory"), "{msg}");
}

#[test]
fn a_received_arena_header_is_checked() {
    let fake = |magic: u64, geometry: u64| {
        let map = Mapping::create("unit-fake-arena", ARENA_BYTES).expect("memfd");
        map.atomics_u64()[H_MAGIC].store(magic, Ordering::Relaxed);
        map.atomics_u64()[H_GEOMETRY].store(geometry, Ordering::Relaxed);
        let fd = map.fd().try_clone_to_owned().expect("dup");
        drop(map); // no longer mapped here as an object
        fd
    };
    let place = Place {
        offset: CELLS_AT as u64,
        stamp: 1,
    };
    let refused = |fd: OwnedFd| {
        receive_cell(fd.as_fd(), place, 24, KIND)
            .map(drop)
            .expect_err("refused")
            .to_string()
    };
    assert!(refused(fake(0, geometry_word(0))).contains("header is not one"));
    assert!(refused(fake(MAGIC, 12345)).contains("geometry"));
    // A well-formed arena whose cell holds nothing: the stamp is wrong.
    let msg = refused(fake(MAGIC, geometry_word(0)));
    assert!(msg.contains("holds no such object"), "{msg}");
    // Not an arena's size.
    let small = Mapping::create("unit-small", 4096).expect("memfd");
    let fd = small.fd().try_clone_to_owned().expect("dup");
    drop(small);
    assert!(refused(fd).contains("4096 bytes where 1048576 were expected"));
}

#[test]
fn threads_never_get_overlapping_cells() {
    let live = Mutex::new(BTreeSet::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for i in 0..5000 {
                    let block = cell(24 + i % 30);
                    let key = (block.file(), block.place().offset);
                    assert!(lock(&live).insert(key), "a live cell handed out twice");
                    if i % 3 == 0 {
                        block.sent();
                    }
                    lock(&live).remove(&key);
                }
            });
        }
    });
}
