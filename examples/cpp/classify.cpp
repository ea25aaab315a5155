// classify: run a distillery ONNX model with the ONNX Runtime C++ API, reading the same metadata contract
// (class names + preprocessing, JSON in the model's metadata entry "distillery") as the Python runtime.
//
//   classify MODEL.onnx IMAGE.ppm...       one line per image: path, top-1 label, probability
//   classify --golden BUNDLE_DIR           the bundle's smoke test in C++: every golden image (its golden/*.ppm
//                                          crop, or with --full the images/ file decoded to PPM by the caller as
//                                          images/<name>.ppm) must give golden.json's top-1 and probabilities
//                                          within its tolerance; exit 1 naming image, expected and got otherwise.
//
// Preprocessing (preprocess.hpp) covers resize (Pillow-exact), centre crop and normalisation; decoding JPEG/PNG
// is left to the caller (images come as binary PPM), so no image library is needed.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "preprocess.hpp"

namespace {

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct Model {
  Ort::Env env{ORT_LOGGING_LEVEL_WARNING, "distillery-classify"};
  Ort::Session session{nullptr};
  std::string input_name, output_name;
  std::vector<std::string> class_names;
  distillery::Contract contract;

  explicit Model(const std::string& path) {
    Ort::SessionOptions opts;
    opts.SetIntraOpNumThreads(1);
    session = Ort::Session(env, path.c_str(), opts);
    Ort::AllocatorWithDefaultOptions alloc;
    Ort::ModelMetadata md = session.GetModelMetadata();
    Ort::AllocatedStringPtr meta = md.LookupCustomMetadataMapAllocated("distillery", alloc);
    if (!meta) throw std::runtime_error(path + ": no \"distillery\" metadata entry; export it with `distillery export`");
    distillery::Json j = distillery::parse_json(meta.get());
    for (const auto& n : j["class_names"].arr) class_names.push_back(n.str);
    contract = distillery::contract_from_json(j["preprocess"]);
    input_name = session.GetInputNameAllocated(0, alloc).get();
    output_name = session.GetOutputNameAllocated(0, alloc).get();
  }

  // probabilities (softmax of the logits) for one image
  std::vector<double> predict(const distillery::Image& decoded, bool already_cropped = false) {
    distillery::Image px = distillery::network_pixels(contract, decoded, already_cropped);
    std::vector<float> x;
    distillery::normalize(contract, px, x);
    std::array<int64_t, 4> shape{1, 3, contract.height, contract.width};
    Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    Ort::Value input = Ort::Value::CreateTensor<float>(mem, x.data(), x.size(), shape.data(), shape.size());
    const char* in_names[] = {input_name.c_str()};
    const char* out_names[] = {output_name.c_str()};
    std::vector<Ort::Value> out = session.Run(Ort::RunOptions{nullptr}, in_names, &input, 1, out_names, 1);
    const float* logits = out[0].GetTensorData<float>();
    size_t k = out[0].GetTensorTypeAndShapeInfo().GetElementCount();
    if (k != class_names.size()) throw std::runtime_error("the model returned " + std::to_string(k) + " logits");
    double m = *std::max_element(logits, logits + k), sum = 0;
    std::vector<double> p(k);
    for (size_t i = 0; i < k; ++i) sum += (p[i] = std::exp(double(logits[i]) - m));
    for (double& v : p) v /= sum;
    return p;
  }
};

size_t argmax(const std::vector<double>& p) { return size_t(std::max_element(p.begin(), p.end()) - p.begin()); }

int check_golden(const std::string& bundle, bool full) {
  distillery::Json g = distillery::parse_json(read_file(bundle + "/golden.json"));
  Model model(bundle + "/" + g["model"].str);
  double tol = g["tolerance"]["probability"].num;
  int failures = 0;
  for (const auto& item : g["images"].arr) {
    std::string file = item["file"].str;
    std::string ppm = full ? bundle + "/" + file.substr(0, file.rfind('.')) + ".ppm" : bundle + "/" + item["crop"].str;
    std::vector<double> p = model.predict(distillery::read_ppm(ppm), !full);
    size_t top = argmax(p), want = size_t(item["index"].num);
    double dp = 0;
    for (size_t i = 0; i < p.size(); ++i) dp = std::max(dp, std::fabs(p[i] - item["probabilities"].arr.at(i).num));
    bool ok = top == want && dp <= tol;
    failures += !ok;
    (ok ? std::cout : std::cerr) << (ok ? "  ok    " : "  FAIL  ") << file << ": expected '" << item["label"].str
                                 << "' (p=" << item["probabilities"].arr.at(want).num << "), got '"
                                 << model.class_names[top] << "' (p=" << p[top] << "), max |dp| " << dp << "\n";
  }
  if (failures) {
    std::cerr << "C++ smoke test FAILED: " << failures << " of " << g["images"].arr.size() << " images\n";
    return 1;
  }
  std::cout << "C++ smoke test passed: " << g["images"].arr.size() << " images reproduce the golden predictions ("
            << (full ? "full images: resize + crop + normalise in C++" : "bundled crops: normalise in C++") << ")\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::vector<std::string> args(argv + 1, argv + argc);
    if (args.size() >= 2 && args[0] == "--golden") {
      bool full = std::find(args.begin(), args.end(), "--full") != args.end();
      return check_golden(args[1], full);
    }
    if (args.size() < 2) {
      std::cerr << "usage: classify MODEL.onnx IMAGE.ppm... | classify --golden BUNDLE_DIR [--full]\n";
      return 2;
    }
    Model model(args[0]);
    for (size_t i = 1; i < args.size(); ++i) {
      std::vector<double> p = model.predict(distillery::read_ppm(args[i]));
      size_t top = argmax(p);
      std::cout << args[i] << "\t" << model.class_names[top] << "\t" << p[top] << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "classify: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
