//! Crash safety of the EAMC file: a process that saves in a loop is killed
//! with SIGKILL after a random delay, many times over. After every kill the
//! file is one complete, valid collection (the last one saved, or the one
//! being saved); the next save leaves no temporary behind; and a run after
//! all of that succeeds.
//!
//! The saving process is this test binary run again with `SAVE_LOOP_PATH`
//! set (see `save_loop`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, SystemTime};

use moe_offload_core::trace::{ActivationCollection, ActivationMatrix, Replacement};

/// Set in the child: the file it saves to.
const SAVE_LOOP_PATH: &str = "MOE_EAMC_SAVE_LOOP_PATH";
/// Set in the child: its first generation.
const SAVE_LOOP_FIRST: &str = "MOE_EAMC_SAVE_LOOP_FIRST";
/// Set in the child: how many saves it makes before exiting (unset: until killed).
const SAVE_LOOP_SAVES: &str = "MOE_EAMC_SAVE_LOOP_SAVES";

/// What the child prints once it starts saving.
const READY: &str = "saving";

const KILLS: usize = 60;
/// Kills land up to this long after the child starts saving: a few saves.
const KILL_WITHIN_US: u64 = 100_000;
const ENTRIES: usize = 100;
const LAYERS: usize = 27;
const EXPERTS: usize = 64;

/// Generation `g` of the collection: every count of every entry is `g`, so
/// a loaded file tells which save wrote it and that no entry is mixed.
/// About 0.7 MB on disk, so that a save takes long enough for kills to land
/// inside it.
fn generation(g: u32) -> ActivationCollection {
    let mut eamc =
        ActivationCollection::new(ENTRIES, LAYERS, EXPERTS, Replacement::Oldest).unwrap();
    let counts = vec![g; LAYERS * EXPERTS];
    let matrix = ActivationMatrix::from_counts(LAYERS, EXPERTS, counts).unwrap();
    for _ in 0..ENTRIES {
        eamc.insert(&matrix).unwrap();
    }
    eamc
}

/// The generation of the complete, valid collection at `path`.
fn generation_of(path: &Path) -> u32 {
    let eamc = ActivationCollection::load(path).expect("the EAMC file is complete and valid");
    assert_eq!(eamc.len(), ENTRIES);
    let g = eamc.entry(0).get(0, 0);
    for k in 0..ENTRIES {
        assert!(
            eamc.entry(k).counts().iter().all(|&c| c == g),
            "entry {k} mixes generations"
        );
    }
    g
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// The child: saves generations `first`, `first + 1`, ... to `path`, each
/// built before the previous one is saved (so that the saves follow one
/// another closely), and says when it starts.
fn save_loop(path: &str) {
    let first: u32 = std::env::var(SAVE_LOOP_FIRST).unwrap().parse().unwrap();
    let saves: Option<u32> = std::env::var(SAVE_LOOP_SAVES)
        .ok()
        .map(|n| n.parse().unwrap());
    let mut g = first;
    let mut next = generation(g);
    println!("{READY}");
    while saves.is_none_or(|n| g < first + n) {
        next.save(Path::new(path)).unwrap();
        g += 1;
        next = generation(g);
    }
}

/// Starts a child saving from generation `first` on; returns once it is
/// about to save, with its output (read it to the end before waiting for a
/// child that exits by itself).
fn spawn_saver(path: &Path, first: u32, saves: Option<u32>) -> (Child, BufReader<ChildStdout>) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "a_save_killed_at_any_point_leaves_one_valid_file",
            "--nocapture",
        ])
        .env(SAVE_LOOP_PATH, path)
        .env(SAVE_LOOP_FIRST, first.to_string())
        .stdout(Stdio::piped());
    if let Some(n) = saves {
        command.env(SAVE_LOOP_SAVES, n.to_string());
    }
    let mut child = command.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while line.trim_end() != READY {
        line.clear();
        let read = out.read_line(&mut line).unwrap();
        assert!(read > 0, "the saving process ended before it saved");
    }
    (child, out)
}

/// xorshift64: random kill delays, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn a_save_killed_at_any_point_leaves_one_valid_file() {
    if let Ok(path) = std::env::var(SAVE_LOOP_PATH) {
        save_loop(&path);
        return;
    }
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill delays from seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warm.eamc");
    generation(1).save(&path).unwrap();
    let mut newest = 1;
    let mut killed_mid_save = 0;
    for _ in 0..KILLS {
        let (mut saver, _out) = spawn_saver(&path, newest + 1, None);
        std::thread::sleep(Duration::from_micros(rng.below(KILL_WITHIN_US)));
        saver.kill().unwrap(); // SIGKILL
        saver.wait().unwrap();

        // One complete collection: the newest before, or one saved since.
        let found = generation_of(&path);
        assert!(found >= newest, "generation {found} replaced {newest}");
        newest = found;
        if names_in(dir.path()).len() > 1 {
            killed_mid_save += 1;
        }
        // The next save removes whatever the killed one left behind.
        newest += 1;
        generation(newest).save(&path).unwrap();
        assert_eq!(names_in(dir.path()), ["warm.eamc"]);
    }
    eprintln!("{killed_mid_save} of {KILLS} kills left a temporary behind");

    // A run after all that succeeds.
    let (mut saver, mut out) = spawn_saver(&path, newest + 1, Some(2));
    std::io::copy(&mut out, &mut std::io::sink()).unwrap();
    let status = saver.wait().unwrap();
    assert!(status.success());
    assert_eq!(generation_of(&path), newest + 2);
    assert_eq!(names_in(dir.path()), ["warm.eamc"]);
}
