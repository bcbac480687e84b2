//! Reading the router's Prometheus text.

/// Sum of every series of `name` (all label sets).
pub fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

pub struct HistogramSummary {
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
}

impl HistogramSummary {
    /// Quantiles as Prometheus' histogram_quantile computes them (linear inside a bucket).
    pub fn of(text: &str, name: &str) -> Self {
        Self::from_buckets(
            buckets(text, name),
            sum_metric(text, &format!("{name}_sum")),
            sum_metric(text, &format!("{name}_count")),
        )
    }

    /// The same for what was observed between the snapshots `before` and `after` (the
    /// second phase of a run).
    pub fn between(before: &str, after: &str, name: &str) -> Self {
        let earlier = buckets(before, name);
        let buckets = buckets(after, name)
            .into_iter()
            .map(|(le, count)| (le, count - earlier.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1)))
            .collect();
        let (sum, count) = (format!("{name}_sum"), format!("{name}_count"));
        Self::from_buckets(
            buckets,
            sum_metric(after, &sum) - sum_metric(before, &sum),
            sum_metric(after, &count) - sum_metric(before, &count),
        )
    }

    fn from_buckets(buckets: Vec<(f64, f64)>, sum: f64, count: f64) -> Self {
        let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
        let q = |q: f64| -> f64 {
            let rank = q * total;
            let mut prev = (0.0, 0.0);
            for &(le, count) in &buckets {
                if count >= rank && count > 0.0 {
                    if le.is_infinite() {
                        return prev.0;
                    }
                    return prev.0 + (le - prev.0) * (rank - prev.1) / (count - prev.1).max(f64::MIN_POSITIVE);
                }
                prev = (le, count);
            }
            f64::NAN
        };
        HistogramSummary { p50: q(0.5), p99: q(0.99), mean: sum / count.max(1.0) }
    }
}

/// The cumulative buckets of histogram `name` (summed over label sets), by bound.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with(&bucket)) {
        let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("");
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
        let count = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        match buckets.iter_mut().find(|b| b.0 == le) {
            Some(b) => b.1 += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}
