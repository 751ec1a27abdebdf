// DirectReader: reads byte ranges of files into caller-owned memory with a pool of worker threads.
//
//   submit([(path, file_offset, nbytes, dest_ptr, dest_nbytes_available), ...]) -> ticket
//      each range is cut into chunks at multiples of chunk_bytes (file offsets) and queued;
//   worker: O_DIRECT pread of the chunk's 4096-aligned superset into its own aligned bounce buffer,
//      then memcpy into dest; when dest and file offset are congruent modulo 4096 (dest_ptr - offset is
//      a multiple of 4096), the whole blocks are read straight into dest and only the partial first and
//      last blocks are copied (zero copy for page-aligned or congruently placed ranges);
//   wait(ticket): blocks until every chunk of the ticket ran; throws ReadError naming file, offset,
//      expected and got bytes if any chunk failed (the ticket is then not a success, whatever landed).
//
// Files are opened once per path and kept open until close(). A file whose O_DIRECT open or read
// fails with EINVAL (a filesystem without direct IO) is read through a normal descriptor from then on
// and listed by buffered_paths(). The reader does not own or keep alive the destination memory: the
// caller must keep it valid until wait() returns. It does not notice a file replaced under the same
// path after its first read (the cached descriptor still names the old inode).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace moe {

// A failed read: the message names the file, the offset, the bytes expected and the bytes got.
class ReadError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// (path, file_offset, nbytes, dest_ptr, dest_nbytes_available) - the Python-facing request tuple.
using RangeTuple = std::tuple<std::string, int64_t, int64_t, uintptr_t, int64_t>;

class DirectReader {
 public:
  DirectReader(int num_threads, bool direct, size_t chunk_bytes);
  ~DirectReader();
  DirectReader(const DirectReader&) = delete;
  DirectReader& operator=(const DirectReader&) = delete;

  uint64_t submit(const std::vector<RangeTuple>& ranges);  // validates, queues, returns at once
  void wait(uint64_t ticket);   // blocks; throws ReadError on failure; forgets the ticket
  bool done(uint64_t ticket);   // true once every chunk of the ticket ran (success or not)
  void close();                 // finishes queued work, joins the workers, closes the files

  uint64_t bytes_disk_read() const { return bytes_disk_read_.load(); }  // incl. alignment padding
  uint64_t bytes_delivered() const { return bytes_delivered_.load(); }
  std::vector<std::string> buffered_paths();
  int num_threads() const { return num_threads_; }
  bool direct() const { return direct_; }
  size_t chunk_bytes() const { return chunk_bytes_; }

 private:
  struct File {
    explicit File(std::string p) : path(std::move(p)) {}
    std::string path;
    std::mutex mu;
    bool opened = false;
    bool use_direct = false;  // read through direct_fd, else through buffered_fd
    int direct_fd = -1;       // kept open after a fall back: a worker may still be reading it
    int buffered_fd = -1;
  };
  struct Ticket {
    std::mutex mu;
    std::condition_variable cv;
    size_t remaining = 0;
    std::string error;  // first failure, empty on success
  };
  struct Task {
    std::shared_ptr<Ticket> ticket;
    std::shared_ptr<File> file;
    uint64_t offset;   // file offset of this chunk
    size_t nbytes;     // bytes of this chunk
    char* dest;        // where its first byte lands
  };

  void worker_loop();
  void run_task(const Task& t, char* bounce);
  int file_fd(File& f, bool* use_direct, int* err);
  int fall_back_to_buffered(File& f, int* err);
  bool read_direct(const Task& t, int fd, char* bounce);
  void read_buffered(const Task& t, int fd);
  std::shared_ptr<File> get_file(const std::string& path);
  std::shared_ptr<Ticket> find_ticket(uint64_t id);

  const int num_threads_;
  const bool direct_;
  const size_t chunk_bytes_;

  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<Task> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
  std::mutex close_mu_;  // serializes close()

  std::mutex files_mu_;
  std::unordered_map<std::string, std::shared_ptr<File>> files_;
  std::mutex paths_mu_;  // taken under a File::mu, never the other way round
  std::vector<std::string> buffered_paths_;

  std::mutex tickets_mu_;
  std::unordered_map<uint64_t, std::shared_ptr<Ticket>> tickets_;
  uint64_t next_ticket_ = 1;

  std::atomic<uint64_t> bytes_disk_read_{0};
  std::atomic<uint64_t> bytes_delivered_{0};
};

}  // namespace moe
