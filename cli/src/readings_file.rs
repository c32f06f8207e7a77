//! Reading files of readings: CSV with a `device,metric,ts_ms,value[,quality]` header, or JSON
//! lines of objects with the same fields. Every error names the file, the line and the reason.

use std::fmt;
use std::io::BufRead;

use fieldgate_shared::{DeviceId, MetricName, Quality, Reading, ShortStr, Value};

/// A line of input that is not a reading, and why.
#[derive(Debug)]
pub struct InputError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.reason)
    }
}

impl std::error::Error for InputError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
}

impl Format {
    /// Picks the format from the file's extension, or else from its first non-blank line.
    pub fn detect(path: &str, first_line: &str) -> Format {
        let lower = path.to_ascii_lowercase();
        if [".jsonl", ".ndjson", ".json"]
            .iter()
            .any(|ext| lower.ends_with(ext))
        {
            Format::JsonLines
        } else if lower.ends_with(".csv") {
            Format::Csv
        } else if first_line.trim_start().starts_with('{') {
            Format::JsonLines
        } else {
            Format::Csv
        }
    }
}

const CSV_COLUMNS: [&str; 5] = ["device", "metric", "ts_ms", "value", "quality"];

/// Where each known column sits in a CSV row.
struct CsvLayout {
    positions: [Option<usize>; 5],
    n_fields: usize,
}

/// An iterator of readings from a file, in file order.
pub struct ReadingsFile<R> {
    input: R,
    file: String,
    line_no: usize,
    line: String,
    format: Option<Format>,
    csv: Option<CsvLayout>,
}

impl<R: BufRead> ReadingsFile<R> {
    /// `file` is the name used in error messages; the format is detected from it and from the
    /// first line.
    pub fn new(input: R, file: &str) -> Self {
        Self {
            input,
            file: file.to_owned(),
            line_no: 0,
            line: String::new(),
            format: None,
            csv: None,
        }
    }

    fn error(&self, reason: impl Into<String>) -> InputError {
        InputError {
            file: self.file.clone(),
            line: self.line_no,
            reason: reason.into(),
        }
    }

    /// The next non-blank line, without its line ending.
    fn next_line(&mut self) -> Option<Result<(), InputError>> {
        loop {
            self.line.clear();
            self.line_no += 1;
            match self.input.read_line(&mut self.line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(err) => return Some(Err(self.error(format!("cannot read: {err}")))),
            }
            let trimmed_len = self.line.trim_end_matches(['\n', '\r']).len();
            self.line.truncate(trimmed_len);
            if !self.line.trim().is_empty() {
                return Some(Ok(()));
            }
        }
    }

    fn parse_csv_header(&self) -> Result<CsvLayout, InputError> {
        let mut positions = [None; 5];
        let fields = split_csv(&self.line).map_err(|reason| self.error(reason))?;
        for (i, field) in fields.iter().enumerate() {
            let name = field.text.trim();
            let Some(column) = CSV_COLUMNS.iter().position(|&c| c == name) else {
                return Err(self.error(format!(
                    "unknown column {name:?}; the columns are device, metric, ts_ms, value and \
                     optionally quality"
                )));
            };
            if positions[column].replace(i).is_some() {
                return Err(self.error(format!("column {name:?} appears twice")));
            }
        }
        if let Some(missing) = (0..4).find(|&c| positions[c].is_none()) {
            return Err(self.error(format!(
                "the header has no {:?} column (expected device,metric,ts_ms,value)",
                CSV_COLUMNS[missing]
            )));
        }
        Ok(CsvLayout {
            positions,
            n_fields: fields.len(),
        })
    }

    fn parse_csv_row(&self, layout: &CsvLayout) -> Result<Reading, String> {
        let fields = split_csv(&self.line)?;
        if fields.len() != layout.n_fields {
            return Err(format!(
                "expected {} fields, found {}",
                layout.n_fields,
                fields.len()
            ));
        }
        let field = |column: usize| &fields[layout.positions[column].expect("required column")];
        let device = DeviceId::new(field(0).text.trim()).map_err(|e| e.to_string())?;
        let metric = MetricName::new(field(1).text.trim()).map_err(|e| e.to_string())?;
        let ts_text = field(2).text.trim();
        let ts_ms = ts_text.parse::<i64>().map_err(|_| {
            format!("bad timestamp {ts_text:?}: expected integer milliseconds since 1970")
        })?;
        let value_field = field(3);
        let value = if value_field.quoted {
            Value::Str(ShortStr::new(&value_field.text).map_err(|e| e.to_string())?)
        } else {
            parse_value(value_field.text.trim())?
        };
        let quality = match layout.positions[4] {
            Some(i) => parse_quality(fields[i].text.trim())?,
            None => Quality::Good,
        };
        Ok(Reading {
            device,
            metric,
            ts_ms,
            value,
            quality,
        })
    }

    fn parse_json_line(&self) -> Result<Reading, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Line {
            device: String,
            metric: String,
            ts_ms: i64,
            value: serde_json::Value,
            #[serde(default)]
            quality: Option<String>,
        }
        let line: Line = serde_json::from_str(&self.line).map_err(|e| e.to_string())?;
        let value = match line.value {
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::I64(i),
                None => Value::F64(n.as_f64().ok_or_else(|| format!("bad number {n}"))?),
            },
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::String(s) => {
                Value::Str(ShortStr::new(&s).map_err(|e| e.to_string())?)
            }
            other => {
                return Err(format!(
                    "value must be a number, a bool or a string, not {other}"
                ))
            }
        };
        Ok(Reading {
            device: DeviceId::new(&line.device).map_err(|e| e.to_string())?,
            metric: MetricName::new(&line.metric).map_err(|e| e.to_string())?,
            ts_ms: line.ts_ms,
            value,
            quality: line
                .quality
                .as_deref()
                .map_or(Ok(Quality::Good), parse_quality)?,
        })
    }
}

impl<R: BufRead> Iterator for ReadingsFile<R> {
    type Item = Result<Reading, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Err(err) = self.next_line()? {
            return Some(Err(err));
        }
        let format = *self
            .format
            .get_or_insert_with(|| Format::detect(&self.file, &self.line));
        let parsed = match format {
            Format::JsonLines => self.parse_json_line(),
            Format::Csv => {
                if self.csv.is_none() {
                    match self.parse_csv_header() {
                        Ok(layout) => self.csv = Some(layout),
                        Err(err) => return Some(Err(err)),
                    }
                    if let Err(err) = self.next_line()? {
                        return Some(Err(err));
                    }
                }
                self.parse_csv_row(self.csv.as_ref().expect("set above"))
            }
        };
        Some(parsed.map_err(|reason| self.error(reason)))
    }
}

/// An unquoted value: `true`/`false`, an integer, or a float (`21.53`, `1e-3`, `NaN`, `inf`).
fn parse_value(text: &str) -> Result<Value, String> {
    match text {
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        "" => return Err("empty value".into()),
        _ => {}
    }
    let integer_like = text
        .strip_prefix(['-', '+'])
        .unwrap_or(text)
        .bytes()
        .all(|b| b.is_ascii_digit());
    if integer_like {
        return text
            .parse::<i64>()
            .map(Value::I64)
            .map_err(|_| format!("bad number {text:?}: integer out of range"));
    }
    text.parse::<f64>()
        .map(Value::F64)
        .map_err(|_| format!("bad number {text:?} (quote the value to store it as a string)"))
}

fn parse_quality(text: &str) -> Result<Quality, String> {
    match text {
        "" | "good" => Ok(Quality::Good),
        "uncertain" => Ok(Quality::Uncertain),
        "bad" => Ok(Quality::Bad),
        other => Err(format!(
            "bad quality {other:?}: expected good, uncertain or bad"
        )),
    }
}

struct CsvField {
    text: String,
    quoted: bool,
}

/// Splits one CSV line on commas; a field in double quotes may hold commas and `""` for a quote.
fn split_csv(line: &str) -> Result<Vec<CsvField>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut text = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        text.push('"');
                    }
                    Some('"') => break,
                    Some(c) => text.push(c),
                    None => return Err("unterminated quoted field".into()),
                }
            }
            match chars.peek() {
                None | Some(',') => {}
                Some(c) => return Err(format!("unexpected {c:?} after a quoted field")),
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                text.push(c);
                chars.next();
            }
        }
        fields.push(CsvField { text, quoted });
        if chars.next().is_none() {
            return Ok(fields);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(file: &str, text: &str) -> Vec<Result<Reading, String>> {
        ReadingsFile::new(text.as_bytes(), file)
            .map(|r| r.map_err(|e| e.to_string()))
            .collect()
    }

    #[test]
    fn values_take_the_type_they_are_written_in() {
        let check = |text: &str, expected: Value| assert_eq!(parse_value(text).unwrap(), expected);
        check("21.53", Value::F64(21.53));
        check("-7", Value::I64(-7));
        check("1e3", Value::F64(1000.0));
        check("true", Value::Bool(true));
        check("-0.0", Value::F64(-0.0));
        assert!(parse_value("12.3.4").unwrap_err().contains("bad number"));
        assert!(parse_value("99999999999999999999")
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn csv_with_quotes_and_reordered_columns() {
        let text =
            "ts_ms,device,metric,value,quality\n\n5,d1,state,\"a, \"\"b\"\"\",bad\n6,d1,t,1.5,\n";
        let readings: Vec<Reading> = read("x.csv", text)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(readings.len(), 2);
        assert_eq!(
            readings[0].value,
            Value::Str(ShortStr::new("a, \"b\"").unwrap())
        );
        assert_eq!(readings[0].quality, Quality::Bad);
        assert_eq!(
            (readings[1].ts_ms, &readings[1].value),
            (6, &Value::F64(1.5))
        );
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let check = |file: &str, text: &str, expected: &str| {
            let results = read(file, text);
            let err = results
                .iter()
                .find_map(|r| r.as_ref().err())
                .expect("an error");
            assert!(err.contains(expected), "{err} lacks {expected}");
        };
        check(
            "a.csv",
            "device,metric,ts,value\n",
            "a.csv:1: unknown column \"ts\"",
        );
        check(
            "a.csv",
            "device,metric,value\n",
            "a.csv:1: the header has no \"ts_ms\"",
        );
        check(
            "a.csv",
            "device,metric,ts_ms,value\nd,m,1,2\nd,m,x,2\n",
            "a.csv:3: bad timestamp",
        );
        check(
            "a.csv",
            "device,metric,ts_ms,value\nd,m,1,abc\n",
            "a.csv:2: bad number \"abc\"",
        );
        check(
            "a.csv",
            "device,metric,ts_ms,value\nd,m,1\n",
            "expected 4 fields, found 3",
        );
        check(
            "a.csv",
            "device,metric,ts_ms,value\nd/x,m,1,2\n",
            "a.csv:2: device name",
        );
        check(
            "b.jsonl",
            "{\"device\":\"d\",\"metric\":\"m\",\"ts_ms\":1,\"value\":[1]}\n",
            "b.jsonl:1: value must be",
        );
        check(
            "b.jsonl",
            "{\"device\":\"d\",\"metric\":\"m\",\"ts_ms\":1,\"value\":1,\"x\":2}\n",
            "unknown field `x`",
        );
        check("b.jsonl", "{\"device\":\"d\",\n", "b.jsonl:1:");
    }

    #[test]
    fn json_lines_are_detected_without_an_extension() {
        let text = "{\"device\":\"d\",\"metric\":\"m\",\"ts_ms\":1,\"value\":2}\n{\"device\":\"d\",\"metric\":\"m\",\"ts_ms\":2,\"value\":2.5,\"quality\":\"uncertain\"}\n";
        let readings: Vec<Reading> = read("-", text).into_iter().map(Result::unwrap).collect();
        assert_eq!(readings[0].value, Value::I64(2));
        assert_eq!(readings[1].value, Value::F64(2.5));
        assert_eq!(readings[1].quality, Quality::Uncertain);
    }
}
