//! Line charts of bench curves, written as SVG (`benches/benches/curves.rs`).
//!
//! A logarithmic axis is drawn as a linear axis of `log10` values whose
//! labels show the values themselves, so one chart type serves every
//! combination of linear and log axes.

use plotters::prelude::*;

/// How a series is drawn: multiproc's in strong colours, the peers in
/// others, floors (sequential, ideal) grey and dashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// multiproc, first series.
    Ours,
    /// multiproc, second series.
    Ours2,
    /// CPython, first series.
    Python,
    /// CPython, second series.
    Python2,
    /// rayon on threads.
    Rayon,
    /// A floor or an ideal.
    Floor,
}

impl Style {
    fn color(self) -> RGBColor {
        match self {
            Style::Ours => RGBColor(200, 30, 30),
            Style::Ours2 => RGBColor(230, 120, 20),
            Style::Python => RGBColor(30, 80, 200),
            Style::Python2 => RGBColor(40, 170, 200),
            Style::Rayon => RGBColor(30, 150, 60),
            Style::Floor => RGBColor(120, 120, 120),
        }
    }
}

/// One named line of points `(x, y)`.
#[derive(Debug, Clone)]
pub struct Series {
    name: String,
    style: Style,
    points: Vec<(f64, f64)>,
}

impl Series {
    /// A series; points with a non-finite or (on a log axis) non-positive
    /// coordinate are left out of the drawing.
    pub fn new(name: &str, style: Style, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.to_string(),
            style,
            points,
        }
    }
}

/// A line chart with a caption and the command that regenerates it.
#[derive(Debug, Clone)]
pub struct Chart {
    title: String,
    x_label: String,
    y_label: String,
    command: String,
    log_x: bool,
    log_y: bool,
    series: Vec<Series>,
}

/// A number as a short label: 1000 -> "1k", 0.001 -> "0.001", 2.5e7 -> "25M".
pub fn short(v: f64) -> String {
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let digits = if scaled.abs() >= 100.0 || scaled == scaled.round() {
        0
    } else if scaled.abs() >= 10.0 {
        1
    } else if scaled.abs() >= 0.1 {
        2
    } else {
        4
    };
    format!("{scaled:.digits$}{suffix}")
}

impl Chart {
    /// An empty chart.
    pub fn new(title: &str, x_label: &str, y_label: &str, command: &str) -> Chart {
        Chart {
            title: title.to_string(),
            x_label: x_label.to_string(),
            y_label: y_label.to_string(),
            command: command.to_string(),
            log_x: false,
            log_y: false,
            series: Vec::new(),
        }
    }

    /// The x axis is logarithmic.
    #[must_use]
    pub fn log_x(mut self) -> Chart {
        self.log_x = true;
        self
    }

    /// The y axis is logarithmic.
    #[must_use]
    pub fn log_y(mut self) -> Chart {
        self.log_y = true;
        self
    }

    /// Adds a series (an empty one, e.g. a peer that did not run, is kept
    /// out of the legend).
    #[must_use]
    pub fn series(mut self, s: Series) -> Chart {
        self.series.push(s);
        self
    }

    fn project(&self, (x, y): (f64, f64)) -> Option<(f64, f64)> {
        let axis = |v: f64, log: bool| {
            if !v.is_finite() || (log && v <= 0.0) {
                None
            } else if log {
                Some(v.log10())
            } else {
                Some(v)
            }
        };
        Some((axis(x, self.log_x)?, axis(y, self.log_y)?))
    }

    fn bounds(&self) -> Option<((f64, f64), (f64, f64))> {
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().filter_map(|&p| self.project(p)))
            .collect();
        let (first, rest) = pts.split_first()?;
        let mut b = ((first.0, first.0), (first.1, first.1));
        for &(x, y) in rest {
            b.0 = (b.0.0.min(x), b.0.1.max(x));
            b.1 = (b.1.0.min(y), b.1.1.max(y));
        }
        let pad = |(lo, hi): (f64, f64), log: bool| {
            let span = if hi > lo { hi - lo } else { 1.0 };
            let p = if log {
                0.1 * span.max(1.0)
            } else {
                0.05 * span
            };
            let lo = if log { lo - p } else { (lo - p).min(0.0) };
            (lo, hi + p)
        };
        Some((pad(b.0, self.log_x), pad(b.1, self.log_y)))
    }

    /// Writes the chart as an SVG file.
    ///
    /// # Errors
    ///
    /// A message when no series has a point or the file cannot be written.
    pub fn write_svg(&self, path: &str) -> Result<(), String> {
        let ((x0, x1), (y0, y1)) = self.bounds().ok_or("no points to draw")?;
        let root = SVGBackend::new(path, (860, 560)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| e.to_string();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (main, foot) = root.split_vertically(530);
        foot.draw(&Text::new(
            format!("regenerate: {}", self.command),
            (10, 8),
            ("sans-serif", 14).into_font().color(&RGBColor(90, 90, 90)),
        ))
        .map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&main)
            .caption(&self.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        let (log_x, log_y) = (self.log_x, self.log_y);
        let fx = move |v: &f64| short(if log_x { 10f64.powf(*v) } else { *v });
        let fy = move |v: &f64| short(if log_y { 10f64.powf(*v) } else { *v });
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| err(&e))?;
        for s in &self.series {
            let pts: Vec<(f64, f64)> = s.points.iter().filter_map(|&p| self.project(p)).collect();
            if pts.is_empty() {
                continue;
            }
            let color = s.style.color();
            let width = if matches!(s.style, Style::Floor) {
                1
            } else {
                2
            };
            let line = LineSeries::new(pts.clone(), color.stroke_width(width));
            chart
                .draw_series(line)
                .map_err(|e| err(&e))?
                .label(&s.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }

    /// The chart's numbers as a Markdown section: one row per x, one
    /// column per series.
    pub fn table(&self, file: &str) -> String {
        let mut xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        let mut out = format!(
            "## {} ({file})\n\n{} -> {}\n\n| {} |",
            self.title, self.x_label, self.y_label, self.x_label
        );
        for s in &self.series {
            out.push_str(&format!(" {} |", s.name));
        }
        out.push_str("\n|---|");
        out.push_str(&"---:|".repeat(self.series.len()));
        out.push('\n');
        for x in xs {
            out.push_str(&format!("| {} |", short(x)));
            for s in &self.series {
                match s.points.iter().find(|p| p.0 == x) {
                    Some(p) => out.push_str(&format!(" {:.4} |", p.1)),
                    None => out.push_str(" — |"),
                }
            }
            out.push('\n');
        }
        out.push('\n');
        out
    }
}
