//! CPU time of a process, read from Linux's `/proc`: what a load run cost the server and
//! the client, beside what it got done. On this benchmark's two shared cores a figure of
//! latency means little without it: "half of peak load" in calls per second is not half
//! of the server's CPU, because calls that arrive one by one are not batched into the
//! same reads, writes and wake-ups as calls that queue up.

/// `/proc/<pid>/stat` counts CPU time in clock ticks of `USER_HZ`, which Linux fixes at
/// 100 per second for every architecture this runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user and system, all threads) that process `pid` has used so far, or this
/// process's own with `None`; `None` where `/proc` cannot tell (not Linux, or gone).
pub fn process_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    parse_stat(&std::fs::read_to_string(path).ok()?)
}

/// utime + stime of a `/proc/<pid>/stat` line, in seconds. The command name (field 2) is
/// in parentheses and may itself hold spaces and parentheses, so fields are counted from
/// the last `)`: after it come state (field 3) and on to utime (14) and stime (15).
fn parse_stat(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_system_ticks_are_read_past_a_command_name_with_spaces() {
        let line = "4242 (key warden) (x)) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    250 75 0 0 20 0 9 0 123 456 789";
        assert_eq!(parse_stat(line), Some(3.25));
        assert_eq!(parse_stat("4242 (cut short) S 1 2"), None);
        assert_eq!(parse_stat("no parentheses at all"), None);
    }

    #[test]
    fn a_busy_process_sees_its_own_cpu_time_grow() {
        let before = process_seconds(None).expect("Linux /proc");
        let started = std::time::Instant::now();
        let mut x = 0u64;
        // Spin until the count moves by a tick; a machine that never gives this thread
        // CPU in 10 s has a problem the test should report.
        while process_seconds(None).expect("Linux /proc") <= before {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "no CPU time counted"
            );
        }
        assert_eq!(process_seconds(Some(u32::MAX)), None, "no such process");
    }
}
