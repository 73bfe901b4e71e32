#pragma once
/// SentencePiece tokenizer (Debian's libsentencepiece): train on a text file,
/// save, load, encode, decode. Special tokens match the byte tokenizer:
/// 0 <pad>, 1 <bos>, 2 <eos>, 3 <image> (the literal "<image>" in a text).
#include <memory>
#include <string>
#include <vector>

#include "vlmkit/data/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace vlmkit {

class SentencePieceTokenizer {
 public:
  /// Trains a model on a UTF-8 text file (one sentence per line) and writes
  /// `<model_prefix>.model` (+ `.vocab`). model_type: "bpe" or "unigram".
  static void train(const std::string& text_file, const std::string& model_prefix, int64_t vocab_size,
                    const std::string& model_type = "bpe");
  explicit SentencePieceTokenizer(const std::string& model_path);
  ~SentencePieceTokenizer();

  std::vector<int64_t> encode(const std::string& text, bool add_bos = true, bool add_eos = false) const;
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = true) const;
  int64_t vocab_size() const;
  const SpecialTokens& special() const { return special_; }
  /// The text of one token ("" for special tokens), for constrained decoding.
  std::string token_text(int64_t id) const;
  /// Writes the model (serialized protobuf) to path.
  void save(const std::string& path) const;

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  SpecialTokens special_;
};

}  // namespace vlmkit
