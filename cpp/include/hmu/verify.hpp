// SHA-256 and the check of graph files against the manifest.json of their build, so a program
// never runs a graph that changed after the build verified it (the Python side's
// core.manifest.verify_build, for the files a program loads).
#pragma once
#include <string>
#include <vector>

namespace hmu {

// Lower-case hex SHA-256 of a byte string / of a file's contents (hmu::Error when unreadable).
std::string sha256_hex(const std::string& bytes);
std::string sha256_file(const std::string& path);

// Checks every file against manifest.json in its folder: listed, same size, same sha256; its
// external-data file (<file>.data, which ONNX Runtime reads beside a graph) too, when present or
// listed. One-line hmu::Error naming the file and what differs; a folder without manifest.json
// is refused (`no_verify_flag` names the option that skips the check, for the message).
void verify_against_manifest(const std::vector<std::string>& files,
                             const std::string& no_verify_flag);

// "<status>: <reason>" of stage `stage` in folder/manifest.json ("" when the folder has no
// manifest or the manifest no such stage): why a build lacks a stage's files, for messages.
std::string manifest_stage_note(const std::string& folder, const std::string& stage);

}  // namespace hmu
