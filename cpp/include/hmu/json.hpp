// A minimal JSON reader: enough for the graph's metadata and manifest.json (no writer needed).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace hmu {

class Json {
 public:
  enum class Kind { Null, Bool, Number, String, Array, Object };

  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Json> array;
  std::map<std::string, Json> object;

  // Throws hmu::Error("<what>: invalid JSON at offset N: ...").
  static Json parse(const std::string& text, const std::string& what);

  bool is_object() const { return kind == Kind::Object; }
  bool is_array() const { return kind == Kind::Array; }
  bool is_number() const { return kind == Kind::Number; }
  bool is_string() const { return kind == Kind::String; }
  // nullptr when this is not an object or has no such key.
  const Json* find(const std::string& key) const;
  // Integer value; throws hmu::Error naming `where` if this is not an integral number.
  int64_t as_int(const std::string& where) const;
};

}  // namespace hmu
