// The distillery preprocessing contract in C++: no dependencies beyond the standard library.
//
//   contract (JSON in the ONNX metadata entry "distillery", key "preprocess"; written by `distillery export`):
//     {"input_size": [3, H, W], "resize": 73 | [h, w], "crop": "center" | "squash", "interpolation": "bicubic",
//      "mean": [...], "std": [...], "scale": 255, "channel_order": "RGB", "layout": "NCHW"}
//
// What this file does, in the runtime's order (runtime/preprocess.py):
//   1. read a binary PPM (P6, 8-bit RGB). Image *decoding* (JPEG, PNG) is not done here: the caller decodes
//      (the test writes PPMs with Pillow, the decoder the Python runtime uses), so decoder differences cannot
//      creep in. An image marked as already resized and cropped (the bundle's golden/*.ppm crops) goes
//      straight to step 4.
//   2. resize: shorter side -> `resize` (torchvision Resize(int) rounding), or keep-ratio / squash to [h, w],
//      with Pillow's own resampling arithmetic (its filters, support scaling when reducing, 22-bit fixed-point
//      coefficients, uint8 rounding between the two passes, and Pillow >= 13's pass order), so the pixels equal
//      Pillow's.
//   3. centre crop to H x W (zero padding when smaller, torchvision CenterCrop rounding).
//   4. normalise: x * (1 / (scale * std)) + (-mean / std), float32, HWC -> CHW.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace distillery {

// ---------------------------------------------------------------------------------------------------------
// A minimal JSON reader (objects, arrays, strings, numbers, true/false/null): enough for the metadata entry.

struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Json> arr;
  std::map<std::string, Json> obj;

  const Json& operator[](const std::string& k) const {
    auto it = obj.find(k);
    if (kind != Object || it == obj.end()) throw std::runtime_error("metadata: missing key \"" + k + "\"");
    return it->second;
  }
  bool has(const std::string& k) const { return kind == Object && obj.count(k); }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}
  Json parse() {
    Json v = value();
    ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("metadata JSON: " + what + " at offset " + std::to_string(i_));
  }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\t' || s_[i_] == '\r')) ++i_;
  }
  char peek() { ws(); return i_ < s_.size() ? s_[i_] : '\0'; }
  void expect(char c) { if (peek() != c) fail(std::string("expected '") + c + "'"); ++i_; }
  Json value() {
    char c = peek();
    Json v;
    if (c == '{') {
      v.kind = Json::Object; ++i_;
      if (peek() == '}') { ++i_; return v; }
      for (;;) {
        std::string k = string_();
        expect(':');
        v.obj[k] = value();
        if (peek() == ',') { ++i_; continue; }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.kind = Json::Array; ++i_;
      if (peek() == ']') { ++i_; return v; }
      for (;;) {
        v.arr.push_back(value());
        if (peek() == ',') { ++i_; continue; }
        expect(']');
        return v;
      }
    }
    if (c == '"') { v.kind = Json::String; v.str = string_(); return v; }
    if (s_.compare(i_, 4, "true") == 0) { i_ += 4; v.kind = Json::Bool; v.b = true; return v; }
    if (s_.compare(i_, 5, "false") == 0) { i_ += 5; v.kind = Json::Bool; return v; }
    if (s_.compare(i_, 4, "null") == 0) { i_ += 4; return v; }
    size_t end = i_;
    while (end < s_.size() && std::string("+-0123456789.eE").find(s_[end]) != std::string::npos) ++end;
    if (end == i_) fail("unexpected character");
    v.kind = Json::Number;
    v.num = std::stod(s_.substr(i_, end - i_));
    i_ = end;
    return v;
  }
  std::string string_() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) fail("bad escape");
      char e = s_[i_++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {  // \uXXXX -> UTF-8 (no surrogate pairs needed for class names in practice)
          unsigned cp = std::stoul(s_.substr(i_, 4), nullptr, 16);
          i_ += 4;
          if (cp < 0x80) out += char(cp);
          else if (cp < 0x800) { out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F)); }
          else { out += char(0xE0 | (cp >> 12)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F)); }
          break;
        }
        default: out += e;  // \" \\ \/
      }
    }
    expect('"');
    return out;
  }
};

inline Json parse_json(const std::string& s) { return JsonParser(s).parse(); }

// ---------------------------------------------------------------------------------------------------------
// The contract

struct Contract {
  int height = 0, width = 0;
  bool resize_is_int = true;
  int resize = 0, resize_h = 0, resize_w = 0;
  std::string crop = "center", interpolation = "bicubic";
  float mean[3] = {0, 0, 0}, stdev[3] = {1, 1, 1};
  float scale = 255.f;
};

inline Contract contract_from_json(const Json& pre) {
  Contract c;
  const Json& size = pre["input_size"];
  if (size.kind != Json::Array || size.arr.size() != 3 || size.arr[0].num != 3)
    throw std::runtime_error("contract: input_size must be [3, H, W]");
  c.height = int(size.arr[1].num);
  c.width = int(size.arr[2].num);
  const Json& r = pre["resize"];
  if (r.kind == Json::Number) { c.resize_is_int = true; c.resize = int(r.num); }
  else if (r.kind == Json::Array && r.arr.size() == 2) {
    c.resize_is_int = false; c.resize_h = int(r.arr[0].num); c.resize_w = int(r.arr[1].num);
  } else throw std::runtime_error("contract: resize must be an int or [h, w]");
  c.crop = pre["crop"].str;
  c.interpolation = pre["interpolation"].str;
  if (c.crop != "center" && c.crop != "squash") throw std::runtime_error("contract: crop '" + c.crop + "' unsupported");
  if (c.crop == "squash" && c.resize_is_int) throw std::runtime_error("contract: crop 'squash' needs resize [h, w]");
  for (int k = 0; k < 3; ++k) { c.mean[k] = float(pre["mean"].arr.at(k).num); c.stdev[k] = float(pre["std"].arr.at(k).num); }
  if (pre.has("scale")) c.scale = float(pre["scale"].num);
  if (pre.has("channel_order") && pre["channel_order"].str != "RGB") throw std::runtime_error("contract: only RGB");
  if (pre.has("layout") && pre["layout"].str != "NCHW") throw std::runtime_error("contract: only NCHW");
  return c;
}

// ---------------------------------------------------------------------------------------------------------
// Images: 8-bit RGB, row-major HWC

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // width * height * 3
  uint8_t* px(int x, int y) { return &rgb[(size_t(y) * width + x) * 3]; }
  const uint8_t* px(int x, int y) const { return &rgb[(size_t(y) * width + x) * 3]; }
};

inline Image read_ppm(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("image " + path + ": cannot open");
  auto token = [&]() {
    std::string t;
    char ch;
    while (f.get(ch)) {
      if (ch == '#') { std::string line; std::getline(f, line); continue; }
      if (std::isspace(static_cast<unsigned char>(ch))) { if (!t.empty()) break; continue; }
      t += ch;
    }
    return t;
  };
  if (token() != "P6") throw std::runtime_error("image " + path + ": not a binary PPM (P6); decode it to one first");
  Image im;
  im.width = std::stoi(token());
  im.height = std::stoi(token());
  if (std::stoi(token()) != 255) throw std::runtime_error("image " + path + ": only 8-bit PPM (maxval 255)");
  im.rgb.resize(size_t(im.width) * im.height * 3);
  f.read(reinterpret_cast<char*>(im.rgb.data()), std::streamsize(im.rgb.size()));
  if (f.gcount() != std::streamsize(im.rgb.size())) throw std::runtime_error("image " + path + ": truncated");
  return im;
}

inline void write_ppm(const std::string& path, const Image& im) {
  std::ofstream f(path, std::ios::binary);
  f << "P6\n" << im.width << " " << im.height << "\n255\n";
  f.write(reinterpret_cast<const char*>(im.rgb.data()), std::streamsize(im.rgb.size()));
}

// ---------------------------------------------------------------------------------------------------------
// Pillow's resampling (libImaging/Resample.c), 8 bits per channel

namespace detail {

constexpr int PRECISION_BITS = 32 - 8 - 2;

inline double filter_value(const std::string& name, double x) {
  if (name == "box") return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0;  // Pillow's box is half-open
  x = std::fabs(x);
  if (name == "bicubic") {
    const double a = -0.5;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
  }
  if (name == "bilinear") return x < 1.0 ? 1.0 - x : 0.0;
  if (name == "hamming") {
    if (x == 0.0) return 1.0;
    if (x >= 1.0) return 0.0;
    x *= M_PI;
    return std::sin(x) / x * (0.54 + 0.46 * std::cos(x));
  }
  if (name == "lanczos") {
    auto sinc = [](double v) { if (v == 0.0) return 1.0; v *= M_PI; return std::sin(v) / v; };
    return x < 3.0 ? sinc(x) * sinc(x / 3.0) : 0.0;
  }
  throw std::runtime_error("interpolation '" + name + "' is not implemented in the C++ example");
}

inline double filter_support(const std::string& name) {
  if (name == "bicubic") return 2.0;
  if (name == "lanczos") return 3.0;
  if (name == "box") return 0.5;
  return 1.0;  // bilinear, hamming
}

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // (xmin, count) per output pixel
  std::vector<int32_t> k;   // fixed-point coefficients, ksize per output pixel
};

inline Coeffs precompute(int in_size, double in0, double in1, int out_size, const std::string& filter) {
  double scale = (in1 - in0) / out_size, filterscale = scale < 1.0 ? 1.0 : scale;
  double support = filter_support(filter) * filterscale;
  Coeffs c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.bounds.resize(size_t(out_size) * 2);
  c.k.assign(size_t(out_size) * c.ksize, 0);
  std::vector<double> kk(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    double center = in0 + (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    int x = 0;
    for (; x < xmax; ++x) { double w = filter_value(filter, (x + xmin - center + 0.5) * ss); kk[x] = w; ww += w; }
    for (x = 0; x < xmax; ++x) if (ww != 0.0) kk[x] /= ww;
    for (; x < c.ksize; ++x) kk[x] = 0;
    for (x = 0; x < c.ksize; ++x) {
      double v = kk[x] * (1 << PRECISION_BITS);
      c.k[size_t(xx) * c.ksize + x] = int32_t(v < 0 ? -0.5 + v : 0.5 + v);
    }
    c.bounds[xx * 2] = xmin;
    c.bounds[xx * 2 + 1] = xmax;
  }
  return c;
}

inline uint8_t clip8(int64_t v) {
  if (v >= (int64_t(1) << PRECISION_BITS << 8)) return 255;
  if (v <= 0) return 0;
  return uint8_t(v >> PRECISION_BITS);
}

inline Image horizontal(const Image& in, int out_w, const std::string& filter) {
  Coeffs c = precompute(in.width, 0, in.width, out_w, filter);
  Image out;
  out.width = out_w; out.height = in.height; out.rgb.resize(size_t(out_w) * in.height * 3);
  for (int y = 0; y < in.height; ++y)
    for (int x = 0; x < out_w; ++x) {
      int xmin = c.bounds[x * 2], n = c.bounds[x * 2 + 1];
      const int32_t* k = &c.k[size_t(x) * c.ksize];
      for (int ch = 0; ch < 3; ++ch) {
        int64_t ss = int64_t(1) << (PRECISION_BITS - 1);
        for (int i = 0; i < n; ++i) ss += int64_t(in.px(xmin + i, y)[ch]) * k[i];
        out.px(x, y)[ch] = clip8(ss);
      }
    }
  return out;
}

inline Image vertical(const Image& in, int out_h, const std::string& filter) {
  Coeffs c = precompute(in.height, 0, in.height, out_h, filter);
  Image out;
  out.width = in.width; out.height = out_h; out.rgb.resize(size_t(in.width) * out_h * 3);
  for (int y = 0; y < out_h; ++y) {
    int ymin = c.bounds[y * 2], n = c.bounds[y * 2 + 1];
    const int32_t* k = &c.k[size_t(y) * c.ksize];
    for (int x = 0; x < in.width; ++x)
      for (int ch = 0; ch < 3; ++ch) {
        int64_t ss = int64_t(1) << (PRECISION_BITS - 1);
        for (int i = 0; i < n; ++i) ss += int64_t(in.px(x, ymin + i)[ch]) * k[i];
        out.px(x, y)[ch] = clip8(ss);
      }
  }
  return out;
}

}  // namespace detail

// Pillow's Image.resize(size, filter): two separable passes with uint8 results in between. Pillow >= 13 runs
// the vertical pass first when the height shrinks by more than twice as much as the width (the runtime's
// _horizontal_first); earlier Pillow always goes horizontally first. Nearest is not implemented.
inline Image resize(const Image& in, int out_w, int out_h, const std::string& filter, bool pillow13_order = true) {
  bool need_h = out_w != in.width, need_v = out_h != in.height;
  bool vertical_first = pillow13_order && (in.height - out_h > 0) && (in.height - out_h > (in.width - out_w) * 2);
  Image im = in;
  if (vertical_first) {
    if (need_v) im = detail::vertical(im, out_h, filter);
    if (need_h) im = detail::horizontal(im, out_w, filter);
  } else {
    if (need_h) im = detail::horizontal(im, out_w, filter);
    if (need_v) im = detail::vertical(im, out_h, filter);
  }
  return im;
}

// Output size of the resize step, with torchvision's (int) and timm's (keep-ratio, squash) rounding.
inline void resized_size(const Contract& c, int w, int h, int* out_w, int* out_h) {
  if (c.crop == "squash") { *out_w = c.resize_w; *out_h = c.resize_h; return; }
  if (c.resize_is_int) {
    if (w <= h) { *out_w = c.resize; *out_h = int(double(c.resize) * h / w); }
    else { *out_w = int(double(c.resize) * w / h); *out_h = c.resize; }
    return;
  }
  double ratio = std::min(double(h) / c.resize_h, double(w) / c.resize_w);
  *out_w = int(std::nearbyint(w / ratio));  // Python round(): half to even, like nearbyint's default mode
  *out_h = int(std::nearbyint(h / ratio));
}

// torchvision CenterCrop: zero padding when smaller, then the centre (round half to even, as Python round()).
inline Image center_crop(const Image& in, int th, int tw) {
  Image src = in;
  if (src.width < tw || src.height < th) {
    Image canvas;
    canvas.width = std::max(src.width, tw); canvas.height = std::max(src.height, th);
    canvas.rgb.assign(size_t(canvas.width) * canvas.height * 3, 0);
    int pl = std::max(tw - src.width, 0) / 2, pt = std::max(th - src.height, 0) / 2;
    for (int y = 0; y < src.height; ++y)
      for (int x = 0; x < src.width; ++x)
        for (int ch = 0; ch < 3; ++ch) canvas.px(x + pl, y + pt)[ch] = src.px(x, y)[ch];
    src = canvas;
  }
  int top = int(std::nearbyint((src.height - th) / 2.0)), left = int(std::nearbyint((src.width - tw) / 2.0));
  Image out;
  out.width = tw; out.height = th; out.rgb.resize(size_t(tw) * th * 3);
  for (int y = 0; y < th; ++y)
    for (int x = 0; x < tw; ++x)
      for (int ch = 0; ch < 3; ++ch) out.px(x, y)[ch] = src.px(x + left, y + top)[ch];
  return out;
}

// Steps 2-3: the H x W image the network sees. `already_cropped`: the image is that already (a bundle's
// golden/*.ppm), so only its size is checked.
inline Image network_pixels(const Contract& c, const Image& im, bool already_cropped = false) {
  if (already_cropped) {
    if (im.width != c.width || im.height != c.height)
      throw std::runtime_error("a preprocessed image must be " + std::to_string(c.width) + "x" +
                               std::to_string(c.height) + ", got " + std::to_string(im.width) + "x" +
                               std::to_string(im.height));
    return im;
  }
  int nw, nh;
  resized_size(c, im.width, im.height, &nw, &nh);
  Image r = (nw == im.width && nh == im.height) ? im : resize(im, nw, nh, c.interpolation);
  return center_crop(r, c.height, c.width);
}

// Step 4: (3, H, W) float32, appended to `out` (so a batch is several calls).
inline void normalize(const Contract& c, const Image& im, std::vector<float>& out) {
  size_t base = out.size(), plane = size_t(im.width) * im.height;
  out.resize(base + 3 * plane);
  for (int ch = 0; ch < 3; ++ch) {
    float mul = 1.0f / (c.scale * c.stdev[ch]), add = -c.mean[ch] / c.stdev[ch];
    for (size_t i = 0; i < plane; ++i) out[base + ch * plane + i] = float(im.rgb[i * 3 + ch]) * mul + add;
  }
}

}  // namespace distillery
