//! What the server tells about itself while a run measures it: its resident
//! memory and CPU time from /proc (same machine), and a scrape of its metrics
//! endpoint (`metrics.listen`); and how busy the whole machine was, including
//! the CPU time its host took away (steal), which no process on it can see.

use anyhow::Context as _;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Clock ticks per second in /proc/<pid>/stat: 100 on every Linux this runs on
/// (`getconf CLK_TCK`).
const TICKS_PER_SECOND: f64 = 100.0;
/// Longest wait for a scrape.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(5);

/// Resident memory of a process, from /proc/<pid>/status.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .context("no VmRSS line")?;
    Ok(kib * 1024)
}

/// CPU time (user + system, all threads) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU time each thread of a process has used so far, in seconds, summed by
/// thread name (a pool's threads share one). A thread that exits before the
/// second reading takes its time with it: compare against [`cpu_seconds`].
pub fn cpu_seconds_by_thread(pid: u32) -> anyhow::Result<BTreeMap<String, f64>> {
    let tasks = format!("/proc/{pid}/task");
    let mut by_name = BTreeMap::new();
    for task in std::fs::read_dir(&tasks).with_context(|| format!("listing {tasks}"))? {
        let path = task?.path();
        // A thread may end between the listing and the reads: skip it.
        let (Ok(name), Ok(seconds)) = (
            std::fs::read_to_string(path.join("comm")),
            stat_cpu_seconds(&path.join("stat").to_string_lossy()),
        ) else {
            continue;
        };
        *by_name.entry(name.trim_end().to_owned()).or_default() += seconds;
    }
    Ok(by_name)
}

/// utime + stime of a /proc stat file, in seconds.
fn stat_cpu_seconds(path: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).context("no ')' in stat")?;
    let mut fields = after_name.split_whitespace();
    // utime and stime are fields 14 and 15; field 3 is the first after the name.
    let utime: f64 = fields.nth(11).and_then(|v| v.parse().ok()).context("no utime")?;
    let stime: f64 = fields.next().and_then(|v| v.parse().ok()).context("no stime")?;
    Ok((utime + stime) / TICKS_PER_SECOND)
}

/// The machine's CPU time so far, in clock ticks summed over its CPUs, from the
/// first line of /proc/stat.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineTicks {
    /// user, nice, system, irq and softirq.
    pub busy: u64,
    /// idle and iowait.
    pub idle: u64,
    /// Taken by the hypervisor for other guests while this one wanted to run.
    pub steal: u64,
}

impl MachineTicks {
    pub fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        Self::parse(stat.lines().next().unwrap_or_default()).context("no cpu line in /proc/stat")
    }

    fn parse(line: &str) -> Option<Self> {
        let mut fields = line.strip_prefix("cpu ")?.split_whitespace().map(str::parse::<u64>);
        let mut next = || fields.next()?.ok();
        let (user, nice, system, idle, iowait, irq, softirq, steal) =
            (next()?, next()?, next()?, next()?, next()?, next()?, next()?, next()?);
        Some(Self {
            busy: user + nice + system + irq + softirq,
            idle: idle + iowait,
            steal,
        })
    }

    /// Percent of the CPU time between `self` and `later` that was busy, and
    /// percent that the host took.
    pub fn shares_until(self, later: Self) -> (f64, f64) {
        let busy = later.busy.saturating_sub(self.busy) as f64;
        let idle = later.idle.saturating_sub(self.idle) as f64;
        let steal = later.steal.saturating_sub(self.steal) as f64;
        let total = (busy + idle + steal).max(1.0);
        (100.0 * busy / total, 100.0 * steal / total)
    }
}

/// Every sample of a Prometheus text scrape, by series (name and labels).
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let text = tokio::time::timeout(SCRAPE_DEADLINE, fetch(addr))
        .await
        .with_context(|| format!("scraping {addr} timed out"))??;
    Ok(parse(&text))
}

async fn fetch(addr: SocketAddr) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the metrics endpoint {addr}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: confab\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP head")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "metrics endpoint answered {head:?}");
    Ok(body.to_owned())
}

fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_resident_memory_and_cpu() {
        assert!(rss_bytes(std::process::id()).unwrap() > 1024 * 1024);
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {}
        assert!(cpu_seconds(std::process::id()).unwrap() > 0.0);
        let by_thread = cpu_seconds_by_thread(std::process::id()).unwrap();
        assert!(by_thread.values().sum::<f64>() > 0.0, "{by_thread:?}");
    }

    #[test]
    fn machine_shares_come_from_the_cpu_line() {
        let before = MachineTicks::parse("cpu  100 0 50 800 10 0 40 0 0 0").unwrap();
        let after = MachineTicks::parse("cpu  130 0 60 830 10 0 50 20 0 0").unwrap();
        assert_eq!(before.shares_until(after), (50.0, 20.0));
        assert_eq!(MachineTicks::parse("cpu0 1 2 3"), None);
        assert!(MachineTicks::now().is_ok());
    }

    #[test]
    fn parses_samples_with_labels_and_skips_comments() {
        let samples =
            parse("# TYPE x summary\nx{stage=\"a b\",quantile=\"0.99\"} 0.004\nx_count{stage=\"a b\"} 12\nbroken\n");
        assert_eq!(samples["x{stage=\"a b\",quantile=\"0.99\"}"], 0.004);
        assert_eq!(samples["x_count{stage=\"a b\"}"], 12.0);
        assert_eq!(samples.len(), 2);
    }
}
