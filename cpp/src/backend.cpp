#include "hmu/backend.hpp"

#include <fstream>
#include <sstream>

#include "hmu/error.hpp"
#include "hmu/json.hpp"

namespace hmu {

Feeds Backend::infer(const Feeds& feeds, bool check) {
  if (check) validate_feeds(info(), feeds);
  return run(feeds);
}

std::unique_ptr<Json> read_manifest_near(const std::string& model_path) {
  const size_t slash = model_path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : model_path.substr(0, slash);
  const std::string path = dir + "/manifest.json";
  std::ifstream in(path);
  if (!in) return nullptr;
  std::stringstream text;
  text << in.rdbuf();
  auto json = std::make_unique<Json>(Json::parse(text.str(), path));
  if (!json->is_object()) throw Error(path + ": not a manifest (expected a JSON object)");
  return json;
}

}  // namespace hmu
