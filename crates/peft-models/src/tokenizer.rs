//! A thin wrapper over the `tokenizers` crate for encoder models: loads a Hugging Face `tokenizer.json`, turns
//! off the file's fixed padding and truncation, and encodes single texts or text pairs into right-padded batches
//! (padded to the longest sequence of the batch) ready for [`crate::bert::BertModel::forward`].

use std::path::Path;

#[cfg(feature = "text")]
use tokenizers::{Encoding, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use peft_core::error::{Error, Result};

/// A right-padded batch of encodings, row-major `[batch, seq]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, `batch * seq` values.
    pub input_ids: Vec<usize>,
    /// Segment ids (0 for the first text, 1 for the second of a pair).
    pub token_type_ids: Vec<usize>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u8>,
    /// `[batch, seq]`.
    pub shape: [usize; 2],
}

impl Batch {
    /// Number of sequences.
    pub fn batch_size(&self) -> usize {
        self.shape[0]
    }

    /// Padded sequence length.
    pub fn seq_len(&self) -> usize {
        self.shape[1]
    }

    /// Number of real (unpadded) tokens of row `i`.
    pub fn len_of(&self, i: usize) -> usize {
        let l = self.shape[1];
        self.attention_mask[i * l..(i + 1) * l].iter().filter(|&&m| m != 0).count()
    }

    /// A batch from equal-length rows of ids (all tokens real, token types 0), for tests and benches.
    ///
    /// # Errors
    /// [`Error::Shape`] when the rows have different lengths.
    pub fn from_rows(rows: &[Vec<usize>]) -> Result<Self> {
        let l = rows.first().map_or(0, Vec::len);
        if let Some(r) = rows.iter().find(|r| r.len() != l) {
            return Err(Error::Shape { op: "Batch::from_rows", lhs: vec![l], rhs: vec![r.len()] });
        }
        let input_ids: Vec<usize> = rows.concat();
        let n = input_ids.len();
        Ok(Batch { input_ids, token_type_ids: vec![0; n], attention_mask: vec![1; n], shape: [rows.len(), l] })
    }

    /// Right-pads `encodings` to the longest one with `pad_id` (type 0, mask 0).
    #[cfg(feature = "text")]
    pub fn pad(encodings: &[Encoding], pad_id: usize) -> Self {
        let l = encodings.iter().map(Encoding::len).max().unwrap_or(0);
        let n = encodings.len() * l;
        let mut b = Batch {
            input_ids: Vec::with_capacity(n),
            token_type_ids: Vec::with_capacity(n),
            attention_mask: Vec::with_capacity(n),
            shape: [encodings.len(), l],
        };
        for e in encodings {
            let pad = l - e.len();
            b.input_ids.extend(e.get_ids().iter().map(|&x| x as usize));
            b.input_ids.extend(std::iter::repeat_n(pad_id, pad));
            b.token_type_ids.extend(e.get_type_ids().iter().map(|&x| x as usize));
            b.token_type_ids.extend(std::iter::repeat_n(0, pad));
            b.attention_mask.extend(e.get_attention_mask().iter().map(|&x| u8::from(x != 0)));
            b.attention_mask.extend(std::iter::repeat_n(0, pad));
        }
        b
    }
}

/// A Hugging Face tokenizer with padding handled per batch and optional truncation.
#[derive(Clone)]
#[cfg(feature = "text")]
pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: usize,
    max_length: Option<usize>,
}

fn tok_err(op: &'static str) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> Error {
    move |source| crate::ModelError::Tokenizer { op, source }.into()
}

#[cfg(feature = "text")]
impl TextTokenizer {
    /// Loads `tokenizer.json`, disabling its fixed padding and truncation. The pad id is taken from the file's
    /// padding settings, else from a `[PAD]` or `<pad>` token, else 0.
    ///
    /// # Errors
    /// [`Error::File`] (with the path) when the file cannot be read or parsed.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut inner = Tokenizer::from_file(path).map_err(|e| Error::file(path, e))?;
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .or_else(|| inner.token_to_id("<pad>"))
            .unwrap_or(0) as usize;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(tok_err("TextTokenizer::from_file"))?;
        Ok(TextTokenizer { inner, pad_id, max_length: None })
    }

    /// Truncates every encoding to at most `max_length` tokens (special tokens included; pairs are shortened
    /// longest-first); `None` disables truncation.
    ///
    /// # Errors
    /// [`crate::ModelError::Tokenizer`] when `max_length` is too small to hold the special tokens.
    pub fn set_max_length(&mut self, max_length: Option<usize>) -> Result<()> {
        let params = max_length.map(|max_length| TruncationParams {
            direction: TruncationDirection::Right,
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        });
        self.inner.with_truncation(params).map_err(tok_err("TextTokenizer::set_max_length"))?;
        self.max_length = max_length;
        Ok(())
    }

    /// The truncation length, if any.
    pub fn max_length(&self) -> Option<usize> {
        self.max_length
    }

    /// The id used for padding.
    pub fn pad_id(&self) -> usize {
        self.pad_id
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Encodes one text with special tokens (`[CLS] text [SEP]`).
    ///
    /// # Errors
    /// [`crate::ModelError::Tokenizer`] from the tokenizer.
    pub fn encode(&self, text: &str) -> Result<Encoding> {
        self.inner.encode(text, true).map_err(tok_err("TextTokenizer::encode"))
    }

    /// Encodes a text pair (`[CLS] a [SEP] b [SEP]`, token types 0 then 1).
    ///
    /// # Errors
    /// [`crate::ModelError::Tokenizer`] from the tokenizer.
    pub fn encode_pair(&self, a: &str, b: &str) -> Result<Encoding> {
        self.inner.encode((a, b), true).map_err(tok_err("TextTokenizer::encode_pair"))
    }

    /// Encodes texts into a batch right-padded to its longest member.
    ///
    /// # Errors
    /// [`crate::ModelError::Tokenizer`] from the tokenizer.
    pub fn batch(&self, texts: &[&str]) -> Result<Batch> {
        let enc = texts.iter().map(|t| self.encode(t)).collect::<Result<Vec<_>>>()?;
        Ok(Batch::pad(&enc, self.pad_id))
    }

    /// Encodes text pairs into a batch right-padded to its longest member.
    ///
    /// # Errors
    /// [`crate::ModelError::Tokenizer`] from the tokenizer.
    pub fn batch_pairs(&self, pairs: &[(&str, &str)]) -> Result<Batch> {
        let enc = pairs.iter().map(|(a, b)| self.encode_pair(a, b)).collect::<Result<Vec<_>>>()?;
        Ok(Batch::pad(&enc, self.pad_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_rows_marks_every_token_real() {
        let b = Batch::from_rows(&[vec![1, 2, 3], vec![4, 5, 6]]).unwrap();
        assert_eq!(b.shape, [2, 3]);
        assert_eq!(b.attention_mask, vec![1; 6]);
        assert_eq!(b.len_of(1), 3);
        assert!(Batch::from_rows(&[vec![1], vec![1, 2]]).is_err());
    }

    #[test]
    #[cfg(feature = "text")]
    fn missing_file_is_a_typed_error() {
        match TextTokenizer::from_file("/nonexistent/tokenizer.json") {
            Err(Error::File { path, .. }) => assert_eq!(path, std::path::Path::new("/nonexistent/tokenizer.json")),
            other => panic!("expected a file error naming the path, got {:?}", other.err()),
        }
    }
}
