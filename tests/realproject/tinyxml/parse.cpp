/* The patient: parses an XML document with libtinyxml, one line per round every 20 ms:
 *   round=<n> plain=<root element> crafted=<result or skipped>
 * "crafted" parses "<?xml " (a declaration that ends right after whitespace), but only
 * while the file named by argv[1] exists: before the CVE-2023-34194 fix TinyXML reaches
 * assert(0) in StringEqual there and the process aborts; fixed, the parse completes
 * (crafted=parsed). A throw and catch of a std::runtime_error around each round's parse
 * keeps the exception machinery busy while the patch comes and goes. */
#include <cstdio>
#include <stdexcept>
#include <unistd.h>
#include <tinyxml.h>

static const char *plain_root()
{
	static TiXmlDocument document;
	document.Clear();
	document.Parse("<?xml version=\"1.0\"?><config><item>1</item></config>");
	if (document.Error() || document.RootElement() == nullptr)
		throw std::runtime_error("plain document not parsed");
	return document.RootElement()->Value();
}

static const char *crafted(const char *trigger)
{
	if (access(trigger, F_OK) != 0)
		return "skipped";
	TiXmlDocument document;
	document.Parse("<?xml ");
	return "parsed";
}

int main(int argc, char **argv)
{
	const char *trigger = argc > 1 ? argv[1] : "/nonexistent";
	for (long round = 0;; round++) {
		try {
			std::printf("round=%ld plain=%s", round, plain_root());
			throw std::runtime_error("caught");
		} catch (const std::runtime_error &error) {
			std::printf(" %s", error.what());
		}
		std::printf(" crafted=%s\n", crafted(trigger));
		std::fflush(stdout);
		usleep(20000);
	}
	return 0;
}
