// SentencePiece tokenizer (see data/sentencepiece.h).
#include "vlmkit/data/sentencepiece.h"

#include <c10/util/Exception.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <fstream>

#include "vlmkit/data/image.h"  // FileNotFoundError

namespace vlmkit {

void SentencePieceTokenizer::train(const std::string& text_file, const std::string& model_prefix, int64_t vocab_size,
                                   const std::string& model_type) {
  if (!std::filesystem::exists(text_file)) throw FileNotFoundError("training text not found: '" + text_file + "'");
  TORCH_CHECK_VALUE(model_type == "bpe" || model_type == "unigram", "SentencePiece model_type must be 'bpe' or ",
                    "'unigram', got '", model_type, "'");
  TORCH_CHECK_VALUE(vocab_size >= 8, "SentencePiece vocab_size must be >= 8, got ", vocab_size);
  const std::string args = "--input=" + text_file + " --model_prefix=" + model_prefix +
                           " --vocab_size=" + std::to_string(vocab_size) + " --model_type=" + model_type +
                           " --pad_id=0 --bos_id=1 --eos_id=2 --unk_id=4 --user_defined_symbols=<image>" +
                           " --character_coverage=1.0 --byte_fallback=true --minloglevel=2" +
                           " --hard_vocab_limit=false" +
                           // Text round-trips exactly: no NFKC, whitespace kept.
                           " --normalization_rule_name=identity --remove_extra_whitespaces=false --add_dummy_prefix=false" +
                           " --split_by_whitespace=true --allow_whitespace_only_pieces=true";
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  TORCH_CHECK_VALUE(status.ok(), "SentencePiece training failed: ", status.ToString());
}

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& model_path)
    : processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  if (!std::filesystem::exists(model_path)) throw FileNotFoundError("SentencePiece model not found: '" + model_path + "'");
  const auto status = processor_->Load(model_path);
  TORCH_CHECK_VALUE(status.ok(), "cannot load SentencePiece model '", model_path, "': ", status.ToString());
  TORCH_CHECK_VALUE(processor_->pad_id() == special_.pad && processor_->bos_id() == special_.bos &&
                        processor_->eos_id() == special_.eos && processor_->PieceToId("<image>") == special_.image,
                    "SentencePiece model '", model_path, "' does not use vlmkit's special ids (pad 0, bos 1, eos 2, ",
                    "<image> 3); train it with SentencePieceTokenizer::train");
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::vector<int64_t> SentencePieceTokenizer::encode(const std::string& text, bool add_bos, bool add_eos) const {
  std::vector<int> pieces;
  const auto status = processor_->Encode(text, &pieces);
  TORCH_CHECK_VALUE(status.ok(), "SentencePiece encode failed: ", status.ToString());
  std::vector<int64_t> ids;
  if (add_bos) ids.push_back(special_.bos);
  ids.insert(ids.end(), pieces.begin(), pieces.end());
  if (add_eos) ids.push_back(special_.eos);
  return ids;
}

std::string SentencePieceTokenizer::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  std::vector<int> pieces;
  std::string out;
  auto flush = [&] {
    if (pieces.empty()) return;
    std::string text;
    const auto status = processor_->Decode(pieces, &text);
    TORCH_CHECK_VALUE(status.ok(), "SentencePiece decode failed: ", status.ToString());
    out += text;
    pieces.clear();
  };
  for (int64_t id : ids) {
    TORCH_CHECK_INDEX(id >= 0 && id < vocab_size(), "SentencePieceTokenizer: token id ", id,
                      " is outside the vocabulary [0, ", vocab_size(), ")");
    if (id == special_.pad || id == special_.bos || id == special_.eos) {
      flush();
      if (!skip_special) out += id == special_.pad ? "<pad>" : id == special_.bos ? "<bos>" : "<eos>";
      continue;
    }
    pieces.push_back(int(id));
  }
  flush();
  return out;
}

int64_t SentencePieceTokenizer::vocab_size() const { return processor_->GetPieceSize(); }

std::string SentencePieceTokenizer::token_text(int64_t id) const {
  if (id < 0 || id >= vocab_size() || processor_->IsControl(int(id)) || processor_->IsUnknown(int(id)) ||
      id == special_.image)
    return "";
  if (processor_->IsByte(int(id))) {
    const auto piece = processor_->IdToPiece(int(id));  // "<0xAB>"
    return std::string(1, char(std::stoi(piece.substr(3, 2), nullptr, 16)));
  }
  auto piece = processor_->IdToPiece(int(id));
  std::string out;
  const std::string space = "\xe2\x96\x81";  // U+2581 marks a word start
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, space.size(), space) == 0) {
      out += ' ';
      i += space.size();
    } else {
      out += piece[i++];
    }
  }
  return out;
}

void SentencePieceTokenizer::save(const std::string& path) const {
  std::ofstream out(path, std::ios::binary);
  TORCH_CHECK_VALUE(bool(out), "cannot write SentencePiece model to '", path, "'");
  const auto bytes = processor_->serialized_model_proto();
  out.write(bytes.data(), std::streamsize(bytes.size()));
  TORCH_CHECK_VALUE(bool(out), "cannot write SentencePiece model to '", path, "'");
}

}  // namespace vlmkit
