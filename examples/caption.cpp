// Loads a checkpoint (for example one trained from Python with `vlmkit train`)
// and captions an image — or answers a question about it:
//
//   caption <checkpoint or run folder> <image> [question]
//
// Prints the generated text, then "logits_sum <value>" (the sum of the first
// step's logits, which tests compare with Python's).
#include <torch/torch.h>
#include <vlmkit/data/datasets.h>
#include <vlmkit/data/image.h>
#include <vlmkit/train/checkpoint.h>
#include <vlmkit/vlmkit.h>

#include <iomanip>
#include <iostream>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: caption <checkpoint> <image> [question]\n";
    return 2;
  }
  try {
    torch::NoGradGuard no_grad;
    auto model = std::dynamic_pointer_cast<vlmkit::EncoderDecoderImpl<>>(vlmkit::load_model(argv[1]));
    if (!model) {
      std::cerr << "caption: the checkpoint is not an encoder_decoder model\n";
      return 2;
    }
    model->eval();
    const int64_t size = model->image_encoder->config()["image_size"].get<int64_t>();
    // The training pipeline's preprocessing: square resize, CLIP normalisation.
    auto rgb = vlmkit::resize_square(vlmkit::load_image(argv[2]), size);
    auto pixels = vlmkit::to_chw_tensor(rgb, vlmkit::Normalization::preset("clip")).unsqueeze(0);
    const std::string question = argc > 3 ? argv[3] : "Describe the image.";
    vlmkit::ByteTokenizer tokenizer;
    auto prompt = vlmkit::encode_prompt({{"user", std::string("<image>") + question}}, tokenizer);
    auto out = model->generate(pixels, {prompt}, vlmkit::GenerationOptions().max_new_tokens(96));
    std::cout << tokenizer.decode(out.tokens[0]) << "\n";
    auto logits = model->forward(pixels, torch::tensor(prompt).unsqueeze(0)).logits;
    std::cout << "logits_sum " << std::setprecision(10) << logits.sum().item<double>() << "\n";
    return 0;
  } catch (const c10::Error& e) {
    std::cerr << "caption: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "caption: " << e.what() << "\n";
    return 1;
  }
}
