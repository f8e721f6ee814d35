//! What else the machine did during the run: the 1-minute load average sampled every
//! 10 s, and how busy the disk under the run's directory was (its `io_ticks`), so a
//! table can say what load it was measured under.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// A background sampler; [`Watch::finish`] stops it and says what it saw.
pub struct Watch {
    stop: Arc<AtomicBool>,
    sampler: JoinHandle<Vec<f64>>,
    started: Instant,
    /// The disk's name and its milliseconds spent doing I/O at the start.
    disk: Option<(String, u64)>,
}

/// The 1-minute load average now.
fn load_1min() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The block device holding `dir`: its sysfs directory name and `io_ticks` (ms busy).
fn disk_busy_ms(dir: &Path) -> Option<(String, u64)> {
    let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(dir).ok()?);
    let sys = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    let name = std::fs::read_link(&sys).ok()?;
    let name = name.file_name()?.to_string_lossy().into_owned();
    // Field 10 of a block device's stat: milliseconds spent doing I/O.
    let ticks = std::fs::read_to_string(format!("{sys}/stat"))
        .ok()?
        .split_whitespace()
        .nth(9)?
        .parse()
        .ok()?;
    Some((name, ticks))
}

impl Watch {
    /// Starts sampling; `dir` is where the run's files live.
    pub fn start(dir: &Path) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    samples.extend(load_1min());
                    next += SAMPLE_EVERY;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            samples
        });
        Watch {
            stop,
            sampler,
            started: Instant::now(),
            disk: disk_busy_ms(dir),
        }
    }

    /// Stops sampling and describes the load: `dir` as given to [`Watch::start`].
    pub fn finish(self, dir: &Path) -> String {
        self.stop.store(true, Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        let samples = self.sampler.join().unwrap_or_default();
        let mut text = format!("{:.0} min", elapsed.as_secs_f64() / 60.0);
        if !samples.is_empty() {
            let mean = samples.iter().sum::<f64>() / samples.len() as f64;
            let max = samples.iter().copied().fold(f64::MIN, f64::max);
            text.push_str(&format!(
                "; load average (1 min, every 10 s) mean {mean:.1}, max {max:.1} on {} cores",
                std::thread::available_parallelism().map_or(0, |n| n.get())
            ));
        }
        if let (Some((name, before)), Some((_, after))) = (self.disk, disk_busy_ms(dir)) {
            let busy = after.saturating_sub(before) as f64 / elapsed.as_millis().max(1) as f64;
            text.push_str(&format!(
                "; host disk {name} busy {:.0}% of the time",
                busy * 100.0
            ));
        }
        text
    }
}
