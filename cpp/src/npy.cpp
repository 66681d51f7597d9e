#include "hmu/npy.hpp"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "hmu/error.hpp"

namespace hmu {
namespace {

const std::map<std::string, std::pair<std::string, size_t>>& descr_table() {
  // kind+size -> (numpy name, itemsize)
  static const std::map<std::string, std::pair<std::string, size_t>> table = {
      {"b1", {"bool", 1}},    {"i1", {"int8", 1}},     {"u1", {"uint8", 1}},
      {"i2", {"int16", 2}},   {"u2", {"uint16", 2}},   {"i4", {"int32", 4}},
      {"u4", {"uint32", 4}},  {"i8", {"int64", 8}},    {"u8", {"uint64", 8}},
      {"f2", {"float16", 2}}, {"f4", {"float32", 4}},  {"f8", {"float64", 8}},
  };
  return table;
}

// Value of 'key' in the header dict, as raw text up to the next top-level ',' or '}'.
std::string header_field(const std::string& header, const std::string& key,
                         const std::string& path) {
  for (const char quote : {'\'', '"'}) {
    std::string needle = std::string(1, quote) + key + quote;
    size_t at = header.find(needle);
    if (at == std::string::npos) continue;
    size_t colon = header.find(':', at + needle.size());
    if (colon == std::string::npos) break;
    size_t begin = colon + 1;
    while (begin < header.size() && header[begin] == ' ') ++begin;
    size_t end = begin;
    int depth = 0;
    while (end < header.size()) {
      char c = header[end];
      if (c == '(' || c == '[') ++depth;
      if (c == ')' || c == ']') --depth;
      if (depth == 0 && (c == ',' || c == '}')) break;
      ++end;
    }
    return header.substr(begin, end - begin);
  }
  throw Error(path + ": not a valid .npy file (header has no '" + key + "')");
}

}  // namespace

std::string first_line(const std::string& text) {
  std::string line = text.substr(0, text.find('\n'));
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
  return line;
}

std::string dtype_from_descr(const std::string& descr, const std::string& where) {
  if (descr.size() == 3 && (descr[0] == '<' || descr[0] == '|' || descr[0] == '=')) {
    auto it = descr_table().find(descr.substr(1));
    if (it != descr_table().end()) return it->second.first;
  }
  if (descr.size() == 3 && descr[0] == '>' && descr.substr(1) != "b1" && descr.substr(1) != "i1" &&
      descr.substr(1) != "u1")
    throw Error(where + ": big-endian arrays ('" + descr + "') are not supported; save with "
                "numpy's native little-endian byte order");
  if (descr.size() == 3 && descr[0] == '>') return dtype_from_descr("|" + descr.substr(1), where);
  throw Error(where + ": unsupported dtype '" + descr + "'");
}

size_t dtype_itemsize(const std::string& dtype) {
  for (const auto& [code, entry] : descr_table())
    if (entry.first == dtype) return entry.second;
  throw Error("unsupported dtype " + dtype);
}

size_t Array::itemsize() const { return dtype_itemsize(dtype); }

int64_t Array::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

Array read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open " + path);
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    throw Error(path + ": not a .npy file (bad magic)");
  const int major = static_cast<unsigned char>(magic[6]);
  uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!in.read(reinterpret_cast<char*>(b), 2)) throw Error(path + ": truncated .npy header");
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!in.read(reinterpret_cast<char*>(b), 4)) throw Error(path + ": truncated .npy header");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  } else {
    throw Error(path + ": unsupported .npy format version " + std::to_string(major));
  }
  if (header_len > (1u << 20)) throw Error(path + ": .npy header too large");
  std::string header(header_len, '\0');
  if (!in.read(header.data(), header_len)) throw Error(path + ": truncated .npy header");

  std::string descr = header_field(header, "descr", path);
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"'))
    throw Error(path + ": unsupported dtype " + descr + " (structured arrays are not inputs)");
  descr = descr.substr(1, descr.size() - 2);
  Array arr;
  arr.dtype = dtype_from_descr(descr, path);
  if (header_field(header, "fortran_order", path) != "False")
    throw Error(path + ": Fortran-order arrays are not supported; save a C-contiguous array "
                "(numpy.ascontiguousarray)");
  std::string shape = header_field(header, "shape", path);
  if (shape.size() < 2 || shape.front() != '(' || shape.back() != ')')
    throw Error(path + ": bad shape in .npy header: " + shape);
  std::istringstream dims(shape.substr(1, shape.size() - 2));
  std::string item;
  while (std::getline(dims, item, ',')) {
    size_t b = item.find_first_not_of(' ');
    if (b == std::string::npos) continue;
    item = item.substr(b, item.find_last_not_of(' ') - b + 1);
    if (!item.empty() && item.back() == 'L') item.pop_back();
    char* end = nullptr;
    long long d = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || d < 0)
      throw Error(path + ": bad shape in .npy header: " + shape);
    arr.shape.push_back(d);
  }
  // Check the size against the file before allocating, so a corrupt header is an error, not
  // an out-of-memory crash.
  const std::streampos data_start = in.tellg();
  in.seekg(0, std::ios::end);
  const auto available = static_cast<uint64_t>(in.tellg() - data_start);
  in.seekg(data_start);
  uint64_t need = arr.itemsize();  // bytes; saturates instead of overflowing
  for (int64_t d : arr.shape) {
    const auto n = static_cast<uint64_t>(d);
    need = n == 0 ? 0 : (need > UINT64_MAX / n ? UINT64_MAX : need * n);
  }
  if (need > available)
    throw Error(path + ": truncated .npy data (shape " + shape_str(arr.shape) +
                " needs more than the " + std::to_string(available) + " bytes the file holds)");
  const auto nbytes = static_cast<size_t>(need);
  arr.data.resize(nbytes);
  if (nbytes && !in.read(reinterpret_cast<char*>(arr.data.data()),
                         static_cast<std::streamsize>(nbytes)))
    throw Error(path + ": truncated .npy data (shape " + shape_str(arr.shape) + " needs " +
                std::to_string(nbytes) + " bytes)");
  return arr;
}

void write_npy(const std::string& path, const Array& array) {
  std::string descr;
  for (const auto& [code, entry] : descr_table())
    if (entry.first == array.dtype) descr = (entry.second == 1 ? "|" : "<") + code;
  if (descr.empty()) throw Error("cannot write dtype " + array.dtype);
  std::string shape = "(";
  for (size_t i = 0; i < array.shape.size(); ++i)
    shape += (i ? ", " : "") + std::to_string(array.shape[i]);
  shape += array.shape.size() == 1 ? ",)" : ")";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape +
                       ", }";
  // magic(6) + version(2) + len(2) + header + '\n' is a multiple of 64.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error("cannot write " + path);
    const char prefix[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
    out.write(prefix, 8);
    const char len[2] = {static_cast<char>(header.size() & 0xFF),
                         static_cast<char>((header.size() >> 8) & 0xFF)};
    out.write(len, 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(reinterpret_cast<const char*>(array.data.data()),
              static_cast<std::streamsize>(array.data.size()));
    if (!out.flush()) {
      std::remove(tmp.c_str());
      throw Error("cannot write " + path + " (disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error("cannot write " + path);
  }
}

}  // namespace hmu
