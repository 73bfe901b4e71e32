#pragma once
/// The byte-level tokenizer: no training, every UTF-8 (or arbitrary byte)
/// string round-trips. Header-only, no torch.
///
/// Ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <image> (the image placeholder), 4-7
/// reserved, then byte b -> b + 8. The literal text "<image>" encodes to the
/// placeholder id.
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <vector>

namespace vlmkit {

struct SpecialTokens {
  int64_t pad = 0;
  int64_t bos = 1;
  int64_t eos = 2;
  int64_t image = 3;
};

class ByteTokenizer {
 public:
  static constexpr int64_t kByteOffset = 8;
  static constexpr const char* kImageText = "<image>";

  int64_t vocab_size() const { return 256 + kByteOffset; }
  const SpecialTokens& special() const { return special_; }

  std::vector<int64_t> encode(const std::string& text, bool add_bos = true,
                              bool add_eos = false) const {
    std::vector<int64_t> ids;
    ids.reserve(text.size() + 2);
    if (add_bos) ids.push_back(special_.bos);
    const std::string image_text = kImageText;
    for (size_t i = 0; i < text.size();) {
      if (text.compare(i, image_text.size(), image_text) == 0) {
        ids.push_back(special_.image);
        i += image_text.size();
      } else {
        ids.push_back(static_cast<unsigned char>(text[i]) + kByteOffset);
        ++i;
      }
    }
    if (add_eos) ids.push_back(special_.eos);
    return ids;
  }

  /// Bytes of the byte tokens; specials are skipped, or written as their
  /// names when skip_special is false. Ids outside the vocabulary raise
  /// IndexError.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = true) const {
    std::string out;
    for (int64_t id : ids) {
      TORCH_CHECK_INDEX(id >= 0 && id < vocab_size(), "ByteTokenizer: token id ", id,
                        " is outside the vocabulary [0, ", vocab_size(), ")");
      if (id >= kByteOffset) {
        out.push_back(static_cast<char>(id - kByteOffset));
      } else if (!skip_special) {
        out += special_name(id);
      }
    }
    return out;
  }

  /// The text a token stands for ("" for specials): what constrained decoding
  /// checks candidate tokens against.
  std::string token_text(int64_t id) const {
    return id >= kByteOffset && id < vocab_size() ? std::string(1, static_cast<char>(id - kByteOffset))
                                                  : std::string();
  }

  std::string special_name(int64_t id) const {
    switch (id) {
      case 0: return "<pad>";
      case 1: return "<bos>";
      case 2: return "<eos>";
      case 3: return kImageText;
      default: return "<reserved" + std::to_string(id) + ">";
    }
  }

 private:
  SpecialTokens special_;
};

}  // namespace vlmkit
